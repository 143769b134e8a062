"""Settings prepared before the visitor asks: every slider step's calibration and quality measurement, computed in
one background thread per model and kept on disk, so moving the slider shows a setting in seconds instead of
recalibrating; a setting the visitor is looking at right now (`request`) goes first, then the compiled decode steps
(where the compiled step is on: dense and TEAL share one, CATS and top-k have their own), so a first Generate does
not wait for a compile. Foreground work pauses it: a
visitor's own calibration runs at full speed, and nothing runs beside a timed measurement (a busy core would skew
it)."""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from typing import Iterator, Sequence

from . import calibrate, fast_decode, metrics
from .models import SparseModel
from .spec import SparsitySpec

GRID = tuple(round(0.05 * step, 2) for step in range(1, 19))  # the sidebar slider's steps above 0
_NOW, _LATER = 0, 1  # queue priorities: a requested setting, then the compile and the grid
COMPILE = "compile"  # queue items (COMPILE, method): compile that method's decode step for prompts of the usual length


class Warmup:
    """Calibrates and measures `methods` x `grid`, nearest to `first` first; `paused()` holds it between steps."""

    def __init__(self, model: SparseModel, methods: Sequence[str] = ("teal", "cats"), grid: Sequence[float] = GRID,
                 first: float = 0.25):
        self.model = model
        methods = [m for m in methods if m != "cats" or model.gated]
        self.plan = [(method, target) for target in sorted(grid, key=lambda t: (abs(t - first), t)) for method in methods]
        self.done = 0  # of the plan
        self.error: str | None = None
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        if fast_decode.compile_by_default(model):
            for method in dict.fromkeys(("teal", *methods, "topk")):
                self._queue.put((_LATER, next(self._order), (COMPILE, method)))
        for item in self.plan:
            self._queue.put((_LATER, next(self._order), item))
        self._idle = threading.Event()
        self._idle.set()
        self._holders = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # alive while there is work queued

    def start(self) -> "Warmup":
        """Work through the queue in a background thread (one at a time; again after `request` adds work)."""
        with self._lock:
            if self.error is None and self._thread is None and not self._queue.empty():
                self._thread = threading.Thread(target=self._run, name="sparse-lab-warmup", daemon=True)
                self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self.done == len(self.plan) or self.error is not None

    def request(self, spec: SparsitySpec) -> None:
        """Measure this spec's quality next, ahead of the grid (what the visitor is waiting for)."""
        self._queue.put((_NOW, next(self._order), spec))
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the warm-up at its next step while this block runs (nested and concurrent holders allowed)."""
        with self._lock:
            self._holders += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._idle.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the queue is worked through (then True when the whole plan is prepared) or `timeout` passes."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.finished

    def _any_spec(self, method: str) -> SparsitySpec | None:
        """A spec of `method`, for its compiled step (the step's shape does not depend on the values): None for TEAL,
        whose step is the dense one."""
        if method == "teal":
            return None
        if method == "topk":
            return self.model.topk_spec(0.25)
        return SparsitySpec.from_tables(method, self.model.dense_spec().values, self.model.fingerprint)

    def _step(self, done: int, total: int) -> None:
        self._idle.wait()  # the engine reports progress between chunks: a pause takes effect there

    def _run(self) -> None:
        while True:
            self._idle.wait()  # before taking an item: what is requested during a pause goes first
            with self._lock:  # deciding to stop and `start` deciding to start never interleave
                try:
                    priority, _, item = self._queue.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            try:
                if isinstance(item, tuple) and item[0] == COMPILE:
                    fast_decode.prepare(self.model, self._any_spec(item[1]), fast_decode.CACHE_BUCKET)
                    continue
                spec = item if isinstance(item, SparsitySpec) else calibrate.calibrate(self.model, *item, progress=self._step)
                metrics.measured(self.model, spec, progress=self._step)
                if priority == _LATER:
                    self.done += 1
            except Exception as err:  # noqa: BLE001 - a failed warm-up only means slower slider steps; say why
                with self._lock:
                    self.error, self._thread = f"{type(err).__name__}: {err}", None
                return
