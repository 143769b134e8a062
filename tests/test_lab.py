"""The service the pages, the CLI, bench and selfcheck drive the engine through: one plain-HF baseline per model, one
spec cache, the setting's stored measurements read back the same way they were made, side-by-side generation, and the
background preparation's lifetime."""
import ast
from pathlib import Path

import pytest

from sparse_core import bench, calibrate, generate, metrics
from sparse_core.lab import GenerationError, Lab

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


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


def test_a_comparison_streams_both_runs_as_each_generates_alone(smollm2):
    """Lab.compare interleaves the dense and the sparse run one token a round, the first alternating; each run's
    tokens are those of generating it alone, and the sparse run's counter saw every decode step."""
    held = Lab(smollm2)
    spec = held.spec_for("topk", 0.5)
    run = held.compare("Name three colours.", spec, "topk", "top-k at 50%", "label", max_new_tokens=6)
    order, rounds = [], []
    run.run(on_token=order.append, on_round=lambda: rounds.append(len(order)))
    prompt = held.prompt("Name three colours.", max_new_tokens=6)
    for name, alone in (("dense", None), ("sparse", spec)):
        assert [t.id for t in run.tokens[name]] == [t.id for t in generate.generate(smollm2, prompt, alone,
                                                                                     max_new_tokens=6).tokens]
    assert order[:4] == ["dense", "sparse", "sparse", "dense"] and rounds[:2] == [2, 4]
    assert not run.partial and run.stage == "done"
    assert len(run.counters["sparse"].pass_matrix("mlp_in", smollm2.num_layers)[0]) == len(run.tokens["sparse"]) - 1
    assert 0.3 < run.achieved < 0.7 and run.cost.bound > 1.0
    chars = run.divergence_chars
    assert (chars is None) == (run.divergence is None) and run.text("sparse")[:chars] == run.text("dense")[:chars]


def test_a_bad_prompt_is_one_sentence_before_anything_runs(smollm2):
    with pytest.raises(GenerationError, match="The prompt is empty"):
        Lab(smollm2).compare("  ", smollm2.topk_spec(0.5), "topk", "n", "l", max_new_tokens=4)


def test_calibrate_uniform_shares_the_spec_cache_and_a_table_is_calibrated_as_asked(smollm2):
    held = Lab(smollm2)
    assert held.calibrate("topk", 0.4) is held.spec_for("topk", 0.4)
    table = [[0.5, 0.0, 0.25, 0.0]] * smollm2.num_layers
    assert held.calibrate("teal", table, text=TEXT) == calibrate.calibrate(smollm2, "teal", table, text=TEXT)


def test_the_background_preparation_is_one_per_lab_and_stops_when_the_lab_is_let_go(smollm2, monkeypatch):
    monkeypatch.setenv("SPARSE_LAB_WARMUP", "1")
    held = Lab(smollm2)
    prepared = held.preparation()
    assert prepared is held.preparation() and not prepared.leased
    held.close()
    assert prepared.stopped
    lease = prepared.lease()  # a stopped preparation does not start again
    assert prepared._thread is None
    lease.release()
    monkeypatch.setenv("SPARSE_LAB_WARMUP", "0")  # the tests' setting: no preparation at all
    assert Lab(smollm2).preparation() is None


def test_pages_reach_the_engine_only_through_the_service():
    """pages/ and app.py import at most the service, the figures, the views and the spec's value types."""
    allowed = {"sparse_core.lab", "sparse_core.figures", "sparse_core.views", "sparse_core.spec"}
    root = Path(__file__).resolve().parent.parent
    for path in [root / "app.py", *sorted((root / "pages").glob("*.py"))]:
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_core"):
                used |= ({f"{node.module}.{a.name}" for a in node.names} if node.module == "sparse_core"
                         else {node.module})
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("sparse_core")}
        assert used <= allowed, (path.name, used - allowed)
