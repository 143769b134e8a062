"""Settings prepared before the visitor asks: every slider step's calibration and quality measurement, computed in
one background thread per model and kept on disk, so moving the slider shows a setting in seconds instead of
recalibrating. Foreground work pauses it: a visitor's own calibration runs at full speed, and nothing runs beside a
timed measurement (a busy core would skew it)."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

from . import calibrate, metrics
from .models import SparseModel

GRID = tuple(round(0.05 * step, 2) for step in range(1, 19))  # the sidebar slider's steps above 0


class Warmup:
    """Calibrates and measures `methods` x `grid`, nearest to `first` first; `paused()` holds it between steps."""

    def __init__(self, model: SparseModel, methods: Sequence[str] = ("teal", "cats"), grid: Sequence[float] = GRID,
                 first: float = 0.25):
        self.model = model
        methods = [m for m in methods if m != "cats" or model.gated]
        self.plan = [(method, target) for target in sorted(grid, key=lambda t: (abs(t - first), t)) for method in methods]
        self.done = 0
        self.error: str | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._holders = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sparse-lab-warmup", daemon=True)

    def start(self) -> "Warmup":
        with self._lock:
            if not self._thread.is_alive() and self.done == 0 and self.error is None:
                self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self.done == len(self.plan) or self.error is not None

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
        """Until every setting is prepared (True) or `timeout` seconds pass (False)."""
        self._thread.join(timeout)
        return self.finished

    def _step(self, done: int, total: int) -> None:
        self._idle.wait()  # the engine reports progress between chunks: a pause takes effect there

    def _run(self) -> None:
        try:
            for method, target in self.plan:
                self._idle.wait()
                spec = calibrate.calibrate(self.model, method, target, progress=self._step)
                metrics.measured(self.model, spec, progress=self._step)
                self.done += 1
        except Exception as err:  # noqa: BLE001 - a failed warm-up only means slower slider steps; say why
            self.error = f"{type(err).__name__}: {err}"
