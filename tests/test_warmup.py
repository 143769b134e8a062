"""The background preparation of slider steps: it works only while a visitor holds a lease on its model, waits while
foreground work on any model holds it, stops when its model is evicted, and leaves every planned setting calibrated
and measured on disk, so a slider step later costs no calibration and no evaluation."""
import time

import pytest

from sparse_core import calibrate, metrics, warmup


def test_warmup_prepares_every_step_on_disk_and_holds_while_paused(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing prepared yet
    prepared = warmup.Warmup(smollm2, methods=("teal", "cats"), grid=(0.15, 0.2, 0.35), first=0.2)
    assert prepared.plan[:2] == [("teal", 0.2), ("cats", 0.2)] and len(prepared.plan) == 6  # nearest the default first
    prepared.start()
    assert prepared._thread is None and prepared.done == 0  # no visitor on this model: nothing runs
    with warmup.paused():
        visitor = prepared.lease()
        assert not prepared.wait(timeout=2.0) and prepared.done == 0  # held while a visitor's work runs
        assert prepared.status() == "paused while a visitor generates or measures"
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
    with warmup.paused():
        prepared.request(spec)
    assert prepared.wait(timeout=600) and order == ["TOPK 30%", "TEAL 20%"]
    prepared.request(later)
    prepared.wait(timeout=600)
    assert order[-1] == "TOPK 45%" and metrics.stored(smollm2, later) is not None
    visitor.release()


def test_the_compiled_step_is_prepared_after_the_requested_and_the_default_setting_and_before_the_grid(smollm2, tmp_path, monkeypatch):
    """Where the compiled step is on (the app's default), the first Generate should not wait for its compile."""
    from sparse_core import fast_decode
    monkeypatch.setenv("SPARSE_LAB_COMPILE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    order = []
    measured = metrics.measured
    monkeypatch.setattr(metrics, "measured", lambda model, s, **kw: order.append(s.label) or measured(model, s, **kw))
    monkeypatch.setattr(fast_decode, "prepare", lambda model, spec, positions: order.append(
        ("compile", spec and spec.method, positions)))
    prepared = warmup.Warmup(smollm2, methods=("teal", "cats"), grid=(0.2,), first=0.2)
    with warmup.paused():
        prepared.lease()
        prepared.request(calibrate.calibrate(smollm2, "topk", 0.3))
    assert prepared.wait(timeout=600) and prepared.done == 2
    steps = [("compile", method, fast_decode.CACHE_BUCKET) for method in (None, "cats", "topk")]  # TEAL's is dense's
    assert order == ["TOPK 30%", "TEAL 20%", *steps, "CATS 20%"]  # the request, the default setting, the compiles
    monkeypatch.setenv("SPARSE_LAB_COMPILE", "0")
    assert not [item for _, _, item in warmup.Warmup(smollm2)._queue.queue if item[0] == warmup.COMPILE]


def test_it_stops_without_a_visitor_and_when_its_model_is_evicted(smollm2, tmp_path, monkeypatch):
    """A visitor who moves to another model (or leaves) releases the lease: the work stops at its next step and goes
    on when a visitor comes back; an evicted model's preparation stops for good."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = warmup.Warmup(smollm2, methods=("teal",), grid=(0.2, 0.3, 0.4), first=0.2)
    steps = []
    measured = metrics.measured
    monkeypatch.setattr(metrics, "measured", lambda model, s, **kw: steps.append(s.label) or measured(model, s, **kw))
    with warmup.paused():
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
