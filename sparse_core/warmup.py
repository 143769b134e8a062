"""Settings prepared before the visitor asks: every slider step's calibration and quality measurement, computed in
one background thread per model and kept on disk, so moving the slider shows a setting in seconds instead of
recalibrating; a setting the visitor is looking at right now (`request`) goes first, then the default setting, then
the compiled decode steps where steps compile (a GPU: dense and TEAL share one, CATS and top-k have their own), so a
first Generate does not wait for a compile. On the CPU nothing compiles: the native step decodes every method.

It yields by design. It works only while some visitor holds a lease on its model (`lease`, released when the visitor
moves to another model or leaves), stops for good when its model is evicted (`stop`), and holds still between steps
while any other heavy work runs, on any model (scheduler.SCHEDULER, where it is the lowest rank): a visitor's own
calibration runs at full speed, and nothing runs beside a timed measurement (a busy core would skew it). A compile
cannot be interrupted once begun, so foreground work waits for one in flight (`compile_in_flight` says which, since
when and for about how long).
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Sequence

from . import calibrate, fast_decode, metrics
from .models import SparseModel
from .scheduler import BACKGROUND, SCHEDULER, describe
from .spec import SparsitySpec

GRID = tuple(round(0.05 * step, 2) for step in range(1, 19))  # the sidebar slider's steps above 0
_NOW, _LATER = 0, 1  # queue priorities: a requested setting, then the compile and the grid
COMPILE = "compile"  # queue items (COMPILE, method): compile that method's decode step for prompts of the usual length
SPEED = "speed"  # queue items (SPEED, spec, compiled): the setting's decode speed, timed while nothing else runs
CALIBRATE = "calibrate"  # queue items (CALIBRATE, method, target): a step's thresholds, ahead of its quality
_POLL_S = 0.25  # how often a waiting thread looks again whether it was stopped or left without visitors


@dataclasses.dataclass(frozen=True)
class Compiling:
    """A compile in flight: what, since when (time.monotonic) and how long its first compile took here, if known."""
    what: str
    since: float
    seconds_on_record: float | None

    def describe(self) -> str:
        elapsed = time.monotonic() - self.since
        estimate = fast_decode.compile_estimate([self.seconds_on_record])
        return f"the background compile of the {self.what} (running for {elapsed:.0f} s; {estimate})"


_IN_FLIGHT: dict[int, Compiling] = {}  # id(Warmup) -> its compile in flight


def compile_in_flight() -> Compiling | None:
    """A background compile running now, on any model, if there is one."""
    return next(iter(list(_IN_FLIGHT.values())), None)


def wait_for_compiles(poll: float = _POLL_S) -> None:
    """Until no background compile is in flight (each ends on its own; none can be interrupted)."""
    while compile_in_flight() is not None:
        time.sleep(poll)


class Lease:
    """One visitor's use of a preparation's model; `release` once, when the visitor moves on or leaves."""

    def __init__(self, warmup: "Warmup"):
        self._warmup, self._released = warmup, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._warmup._lease(-1)


class Warmup:
    """Calibrates and measures `methods` x `grid`, nearest to `first` first, while leased and not paused."""

    def __init__(self, model: SparseModel, methods: Sequence[str] = ("teal", "cats"), grid: Sequence[float] = GRID,
                 first: float = 0.25, measure_speed: Callable[..., dict] | None = None):
        """`measure_speed(spec, compiled, progress=...)` times and stores a setting's decode (Lab.measure_decode):
        what `request_speed` asks for."""
        self.model = model
        self._measure_speed = measure_speed
        self._speeds_asked: set = set()
        methods = [m for m in methods if m != "cats" or model.gated]
        self.plan = [(method, target) for target in sorted(grid, key=lambda t: (abs(t - first), t)) for method in methods]
        self.done = 0  # of the plan
        self.error: str | None = None
        self.stopped = False
        self.doing: str | None = None  # what the thread works on now, for the page
        self.measure_seconds: float | None = None  # how long its last quality measurement took
        self._leases = 0
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        compiles = [(COMPILE, method) for method in dict.fromkeys(("teal", *methods, "topk"))
                    if fast_decode.compiles(model)]
        # The default setting is the first a visitor sees; then every step's calibration, nearest first, since a
        # slider step waits for its thresholds before Generate answers (its quality fills the headline later); then
        # every step's quality.
        calibrations = [(CALIBRATE, *item) for item in self.plan[1:]]
        for item in self.plan[:1] + compiles + calibrations + self.plan[1:]:
            self._queue.put((_LATER, next(self._order), item))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # alive while there is work queued, a lease and no stop

    def lease(self) -> Lease:
        """A visitor uses this model: the preparation works (again) until every lease is released."""
        self._lease(+1)
        return Lease(self)

    def _lease(self, change: int) -> None:
        with self._lock:
            self._leases += change
        if change > 0:
            self.start()

    @property
    def leased(self) -> bool:
        return self._leases > 0

    @property
    def working(self) -> bool:
        """It can still prepare what a visitor asks for: leased, not stopped, not failed."""
        return self.leased and not self.stopped and self.error is None

    def stop(self) -> None:
        """For good (the model was evicted): the thread ends after its current step and lets the model go."""
        with self._lock:
            self.stopped = True
            if self._thread is None:
                self.model = None

    def start(self) -> "Warmup":
        """Work through the queue in a background thread (one at a time; again after `request` adds work)."""
        with self._lock:
            if (self.error is None and not self.stopped and self._leases > 0 and self._thread is None
                    and not self._queue.empty()):
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

    def request_speed(self, spec: SparsitySpec, compiled: bool) -> None:
        """Time this setting's decode next (after a quality asked for before it), once, in a quiet moment: it runs
        only while no other heavy work does, and a visitor who starts something meanwhile discards the attempt,
        which starts again when the machine is quiet again."""
        if self._measure_speed is None or (spec, compiled) in self._speeds_asked:
            return
        self._speeds_asked.add((spec, compiled))
        self._queue.put((_NOW, next(self._order), (SPEED, spec, compiled)))
        self.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the thread ends (then True when the whole plan is prepared) or `timeout` passes."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.finished

    def status(self) -> str:
        """What the preparation is doing, for a visitor waiting on it (one clause)."""
        compiling = _IN_FLIGHT.get(id(self))
        if compiling is not None:
            return f"busy with {compiling.describe()}"
        ahead = SCHEDULER.ahead_of(BACKGROUND)
        if ahead:
            return f"paused behind {describe(ahead)}"
        return self.doing or "starting"

    def _any_spec(self, method: str) -> SparsitySpec | None:
        """A spec of `method`, for its compiled step (the step's shape does not depend on the values): None for TEAL,
        whose step is the dense one."""
        if method == "teal":
            return None
        if method == "topk":
            return self.model.topk_spec(0.25)
        return SparsitySpec.from_tables(method, self.model.dense_spec().values, self.model.fingerprint)

    def _may_run(self) -> bool:
        """Wait while other heavy work runs; False when the thread should end instead (stopped, or no visitor)."""
        gone = lambda: self.stopped or not self.leased
        return SCHEDULER.wait_turn(BACKGROUND, give_up=gone) and not gone()

    def _step(self, done: int, total: int) -> None:
        if not self._may_run():  # the engine reports progress between chunks: a pause or a stop takes effect there
            raise _Leave

    def _quiet(self, done: int, total: int) -> None:
        """Between a timing's runs: anything else that started meanwhile skews it, so the attempt is dropped."""
        if SCHEDULER.ahead_of(BACKGROUND) or self.stopped or not self.leased or SCHEDULER.closing:
            raise _Leave

    def _compile(self, method: str) -> None:
        spec = self._any_spec(method)
        what = f"{'dense/TEAL' if method == 'teal' else method.upper()} decode step"
        fast = fast_decode.decoder(self.model)
        record = fast and fast_decode.compile_seconds_on_record(fast, spec, fast_decode.CACHE_BUCKET)
        _IN_FLIGHT[id(self)] = Compiling(what, time.monotonic(), record)
        try:
            # Announced first, checked second: foreground work that began meanwhile either saw the announcement (and
            # waits for this compile) or is seen here (and this compile waits for it).
            if SCHEDULER.ahead_of(BACKGROUND):
                raise _Leave
            fast_decode.prepare(self.model, spec, fast_decode.CACHE_BUCKET)
        finally:
            _IN_FLIGHT.pop(id(self), None)

    def _run(self) -> None:
        while True:
            self._may_run()  # waits out other heavy work
            with self._lock:  # deciding to end and `start` deciding to start never interleave
                if self.stopped or not self.leased or self._queue.empty() or SCHEDULER.closing:
                    self._thread = self.doing = None
                    if self.stopped:
                        self.model = None  # evicted: nothing here keeps it in memory
                    return
                priority, order, item = self._queue.get_nowait()
            try:
                with SCHEDULER.running("background preparation", BACKGROUND):
                    self._work(priority, item)
            except _Leave:  # stopped, left or paused mid-step: the item goes back, to be done later
                self._queue.put((priority, order, item))  # in its old place
            except Exception as err:  # noqa: BLE001 - a failed warm-up only means slower slider steps; say why
                with self._lock:
                    self.error, self._thread, self.doing = f"{type(err).__name__}: {err}", None, None
                return

    def _work(self, priority: int, item) -> None:
        """One queue item: a compile, a timing, a step's calibration, a requested spec's quality, or a planned step's
        calibration and quality."""
        if isinstance(item, tuple) and item[0] == COMPILE:
            self._compile(item[1])
            return
        if isinstance(item, tuple) and item[0] == SPEED:
            self.doing = f"timing {item[1].label}'s decode while the machine is quiet"
            self._quiet(0, 1)
            self._measure_speed(item[1], item[2], progress=self._quiet)
            return
        if isinstance(item, tuple) and item[0] == CALIBRATE:
            self.doing = f"calibrating {item[1].upper()} {item[2]:.0%}"
            calibrate.calibrate(self.model, *item[1:], progress=self._step)
            return
        if isinstance(item, SparsitySpec):
            self.doing = f"measuring {item.label}'s quality"
            spec = item
        else:
            self.doing = f"calibrating and measuring {item[0].upper()} {item[1]:.0%}"
            spec = calibrate.calibrate(self.model, *item, progress=self._step)
        began = time.monotonic()
        if metrics.stored(self.model, spec) is None:
            metrics.measured(self.model, spec, progress=self._step)
            self.measure_seconds = time.monotonic() - began
        if priority == _LATER:
            self.done += 1


class _Leave(Exception):
    """Raised from a progress callback: the preparation was stopped or lost its last visitor mid-step."""
