"""The background preparation of slider steps: it works only while a visitor holds a lease on its model, waits while
other heavy work on any model runs (the scheduler's lowest rank), stops when its model is evicted, and leaves every
planned setting calibrated and measured on disk, so a slider step later costs no calibration and no evaluation; it
times the setting in view only while nothing else runs."""
import threading
import time

import pytest

from sparse_core import calibrate, metrics, warmup
from sparse_core.scheduler import SCHEDULER, VISITOR


def paused():
    """A visitor's request in flight: every background preparation holds still."""
    return SCHEDULER.running("a visitor's generation", VISITOR)


def test_warmup_prepares_every_step_on_disk_and_holds_while_paused(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing prepared yet
    prepared = warmup.Warmup(smollm2, methods=("teal", "cats"), grid=(0.15, 0.2, 0.35), first=0.2)
    assert prepared.plan[:2] == [("teal", 0.2), ("cats", 0.2)] and len(prepared.plan) == 6  # nearest the default first
    prepared.start()
    assert prepared._thread is None and prepared.done == 0  # no visitor on this model: nothing runs
    with paused():
        visitor = prepared.lease()
        assert not prepared.wait(timeout=2.0) and prepared.done == 0  # held while a visitor's work runs
        assert prepared.status().startswith("paused behind a visitor's generation (running for")
    assert prepared.wait(timeout=600) and prepared.error is None and prepared.done == 6
    visitor.release()

    monkeypatch.setattr(calibrate, "score_histograms", lambda *a, **k: pytest.fail("calibrated again"))
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: pytest.fail("measured again"))
    for method, target in prepared.plan:  # what a slider step now does: both come back from disk
        metrics.measured(smollm2, calibrate.calibrate(smollm2, method, target))


def test_a_requested_setting_is_measured_first_and_after_the_plan(smollm2, tmp_path, monkeypatch):
    """What the visitor is looking at jumps the queue; a request after the plan is done starts the thread again."""
    spec = calibrate.calibrate(smollm2, "topk", 0.3)  # no calibration pass: only the measurement
    later = calibrate.calibrate(smollm2, "topk", 0.45)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = warmup.Warmup(smollm2, methods=("teal",), grid=(0.2,), first=0.2)
    order = []
    measured = metrics.measured
    monkeypatch.setattr(metrics, "measured", lambda model, s, **kw: order.append(s.label) or measured(model, s, **kw))
    visitor = prepared.lease()
    with paused():
        prepared.request(spec)
    assert prepared.wait(timeout=600) and order == ["TOPK 30%", "TEAL 20%"]
    prepared.request(later)
    prepared.wait(timeout=600)
    assert order[-1] == "TOPK 45%" and metrics.stored(smollm2, later) is not None
    visitor.release()


def test_the_compiled_step_is_prepared_after_the_requested_and_the_default_setting_and_before_the_grid(smollm2, tmp_path, monkeypatch):
    """Where steps compile (a GPU) the first Generate should not wait for its compile; on the CPU the native step
    decodes every method, and no compile is queued at all."""
    from sparse_core import fast_decode
    monkeypatch.setenv("SPARSE_LAB_COMPILE", "1")
    assert not [item for _, _, item in warmup.Warmup(smollm2)._queue.queue if item[0] == warmup.COMPILE]
    monkeypatch.setattr(fast_decode, "compiles", lambda model: True)  # as on a GPU
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    order = []
    measured = metrics.measured
    monkeypatch.setattr(metrics, "measured", lambda model, s, **kw: order.append(s.label) or measured(model, s, **kw))
    monkeypatch.setattr(fast_decode, "prepare", lambda model, spec, positions: order.append(
        ("compile", spec and spec.method, positions)))
    prepared = warmup.Warmup(smollm2, methods=("teal", "cats"), grid=(0.2,), first=0.2)
    with paused():
        prepared.lease()
        prepared.request(calibrate.calibrate(smollm2, "topk", 0.3))
    assert prepared.wait(timeout=600) and prepared.done == 2
    steps = [("compile", method, fast_decode.CACHE_BUCKET) for method in (None, "cats", "topk")]  # TEAL's is dense's
    assert order == ["TOPK 30%", "TEAL 20%", *steps, "CATS 20%"]  # the request, the default setting, the compiles


def test_it_stops_without_a_visitor_and_when_its_model_is_evicted(smollm2, tmp_path, monkeypatch):
    """A visitor who moves to another model (or leaves) releases the lease: the work stops at its next step and goes
    on when a visitor comes back; an evicted model's preparation stops for good."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = warmup.Warmup(smollm2, methods=("teal",), grid=(0.2, 0.3, 0.4), first=0.2)
    steps = []
    measured = metrics.measured
    monkeypatch.setattr(metrics, "measured", lambda model, s, **kw: steps.append(s.label) or measured(model, s, **kw))
    with paused():
        visitor = prepared.lease()
        visitor.release()  # gone before the first step
        visitor.release()  # a second release changes nothing
    assert prepared.wait(timeout=60) is False and steps == [] and prepared._thread is None
    again = prepared.lease()
    deadline = time.monotonic() + 600
    while not steps and time.monotonic() < deadline:
        time.sleep(0.05)
    prepared.stop()  # evicted (Lab.close)
    prepared.wait(timeout=600)
    assert prepared.stopped and prepared._thread is None and 1 <= len(steps) < 3
    prepared.lease()  # a stopped preparation does not start again
    assert prepared._thread is None
    again.release()


def test_the_setting_in_view_is_timed_only_while_nothing_else_runs(smollm2):
    """Its decode speed is timed once, in a quiet moment: never while a visitor's request runs, and an attempt that a
    visitor's request interrupts is dropped between its runs and made again once the machine is quiet."""
    calls, first_run, visitor_in, dropped = [], threading.Event(), threading.Event(), threading.Event()

    def measure(spec, compiled, progress):
        calls.append(("start", spec.label, compiled))
        progress(1, 3)
        if len(calls) == 1:  # the first attempt: a visitor starts something between its runs
            first_run.set()
            assert visitor_in.wait(60)
        try:
            progress(2, 3)
        except BaseException:
            dropped.set()
            raise
        progress(3, 3)
        calls.append("stored")
        return {}
    prepared = warmup.Warmup(smollm2, methods=("teal",), grid=(), measure_speed=measure)
    spec = smollm2.topk_spec(0.3)
    with paused():
        visitor = prepared.lease()
        prepared.request_speed(spec, True)
        prepared.request_speed(spec, True)  # asked once
        assert calls == []  # nothing is timed beside a visitor's request
    assert first_run.wait(60)
    with paused():
        visitor_in.set()
        assert dropped.wait(60) and calls == [("start", spec.label, True)]  # dropped, and not made again meanwhile
    assert prepared.wait(timeout=60)
    assert calls == [("start", spec.label, True), ("start", spec.label, True), "stored"]
    visitor.release()
