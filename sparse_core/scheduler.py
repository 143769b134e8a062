"""One queue for the heavy work on the machine's cores, across every visitor and model: a visitor's own request (a
generation, the calibration or quality measurement a page waits for) goes first, then the long jobs a visitor
starts (sweeps, benchmarks, layer timing), then the background preparation. Work of a lower rank yields between
its chunks while work of a higher rank runs, and whoever waits can say behind what, and for about how long.

Nothing here interrupts a chunk in progress (a forward pass, a compile): a higher rank waits at most one chunk. At
shutdown (`close`) every waiter gives up and the work in flight is waited for, so no thread is inside torch's C++
when the interpreter ends (a daemon thread unwound there aborts the process) and nothing is left half-written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Callable, Iterator

VISITOR, JOB, BACKGROUND = 0, 1, 2  # ranks: a visitor's request, a job a visitor started, background preparation
_POLL_S = 0.25  # how often a waiting thread looks again


@dataclasses.dataclass(eq=False)
class Work:
    """Heavy work in flight: what it is (a noun phrase), its rank, since when, and how long it has left if known."""
    what: str
    rank: int
    since: float = dataclasses.field(default_factory=time.monotonic)
    left: Callable[[], float | None] = lambda: None

    def describe(self) -> str:
        left = self.left()
        return f"{self.what} (running for {time.monotonic() - self.since:.0f} s" + (
            f", about {left:.0f} s left)" if left is not None else ")")


class Scheduler:
    def __init__(self):
        self.closing = False  # shutting down: work in flight ends at its next chunk
        self._work: dict[int, Work] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    @contextlib.contextmanager
    def running(self, what: str, rank: int, left: Callable[[], float | None] = lambda: None) -> Iterator[Work]:
        """Register this block as heavy work of `rank` while it runs (nested and concurrent holders allowed)."""
        work = Work(what, rank, left=left)
        with self._lock:
            key = next(self._ids)
            self._work[key] = work
        try:
            yield work
        finally:
            with self._changed:
                del self._work[key]
                self._changed.notify_all()

    def ahead_of(self, rank: int) -> list[Work]:
        """Work of a higher rank running now, the oldest first."""
        with self._lock:
            return sorted((w for w in self._work.values() if w.rank < rank), key=lambda w: w.since)

    def wait_turn(self, rank: int, waiting: Callable[[str], None] | None = None,
                  give_up: Callable[[], bool] = lambda: False) -> bool:
        """Until no work of a higher rank runs (True), or `give_up()` says to stop waiting (False). While it waits,
        `waiting(sentence)` hears every poll what it waits behind; `waiting(None)` when its turn has come."""
        waited = False
        while True:
            if self.closing:
                return False
            ahead = self.ahead_of(rank)
            if not ahead:
                if waited and waiting:
                    waiting(None)
                return True
            if give_up():
                return False
            if waiting:
                waiting(f"waiting behind {describe(ahead)}")
            waited = True
            with self._changed:
                self._changed.wait(_POLL_S)


    def close(self, timeout: float) -> bool:
        """Shut down: from now on every wait_turn gives up and `closing` tells work in flight to end at its next
        chunk; wait up to `timeout` seconds for it to end (True when it has)."""
        self.closing = True
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._work and time.monotonic() < deadline:
                self._changed.wait(_POLL_S)
            return not self._work


def describe(works: list[Work]) -> str:
    """What runs, in one clause: the first, and how many more."""
    more = len(works) - 1
    return works[0].describe() + (f" and {more} more" if more > 0 else "")


SCHEDULER = Scheduler()
