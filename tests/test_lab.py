"""The service the pages, bench and selfcheck drive the engine through: one plain-HF baseline per model, one spec
cache, and the setting's stored measurements read back the same way they were made."""
from sparse_core import bench, calibrate, metrics
from sparse_core.lab import Lab


def test_the_plain_baseline_is_loaded_once_with_the_same_weights(smollm2):
    lab = Lab(smollm2)
    plain = lab.plain()
    assert plain is lab.plain() and plain is not smollm2
    assert plain.layout == "hf" and plain.fingerprint == smollm2.fingerprint and plain.dtype == smollm2.dtype
    assert Lab(plain).plain() is None  # the hf layout is its own baseline


def test_a_spec_is_calibrated_once_per_method_and_target(smollm2, monkeypatch):
    calls = []
    real = calibrate.calibrate
    monkeypatch.setattr(calibrate, "calibrate", lambda *args, **kwargs: calls.append(args[1:3]) or real(*args, **kwargs))
    lab = Lab(smollm2)
    assert lab.known_spec("topk", 0.3) is None
    first = lab.spec_for("topk", 0.3)
    assert lab.spec_for("topk", 0.30000001) is first and lab.known_spec("topk", 0.3) is first
    assert calls == [("topk", 0.3)]
    assert first.method == "topk" and first.values == smollm2.topk_spec(0.3).values


def test_the_decode_measurement_includes_plain_hf_and_reads_back_as_stored(smollm2, monkeypatch):
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: None)  # a busy test machine: keep the timing valid
    lab = Lab(smollm2)
    spec = lab.spec_for("topk", 0.5)
    result = lab.measure_decode(spec, compiled=False, new_tokens=3, repeats=2)
    assert result["plain_hf_tok_s"] is not None and result["flag"] is None
    assert lab.decode_speed(spec, False) == bench.stored_decode(smollm2, spec, False) is not None
    assert lab.stored_quality(spec) == metrics.stored(smollm2, spec)
