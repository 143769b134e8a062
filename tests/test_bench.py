"""Smoke tests of the benchmark functions on tiny settings (no timing assertions: timings vary by machine)."""
import json

from sparse_core import bench
from sparse_core.__main__ import main

KEYS = {"out_features", "in_features", "dtype", "sparsity", "hf_dense_ms", "dense_ms", "sparse_ms", "speedup", "bound"}


def test_kernel_rows_report_every_setting_with_progress():
    seen = []
    rows = bench.kernel_rows(shapes=((48, 80),), dtypes=("float32", "bfloat16"), sparsities=(0.0, 0.5), repeats=2,
                             progress=lambda done, total: seen.append((done, total)))
    assert [(r["dtype"], r["sparsity"]) for r in rows] == [("float32", 0.0), ("float32", 0.5), ("bfloat16", 0.0), ("bfloat16", 0.5)]
    assert all(set(r) == KEYS and r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)
    assert rows[1]["bound"] == 2.0 and seen[-1] == (4, 4)


def test_decode_result_fields_and_model_bound(smollm2, capsys):
    result = bench.decode_result(0.5, new_tokens=3, repeats=1, model=smollm2)
    assert set(result) == {"model", "dtype", "backend", "new_tokens", "dense_tok_s", "sparse_tok_s", "speedup",
                           "bound", "achieved_sparsity"}
    assert 1.5 < result["bound"] < 1.8 and 0.3 < result["achieved_sparsity"] < 0.7
    total, sparsifiable = bench.model_bytes(smollm2)
    assert 0.6 < sparsifiable / total < 0.9  # the tied head/embedding is read once per token and not sparsified


def test_decode_bound_in_the_cats_layout_leaves_out_up(smollm2):
    """TEAL reads all of up in the cats layout, so its bound and measured skipped share count only the rest."""
    from sparse_core import models
    cats = models.load(layout="cats")
    result = bench.decode_result(0.5, new_tokens=3, repeats=1, model=cats)
    default = bench.decode_result(0.5, new_tokens=3, repeats=1, model=smollm2)
    assert 1.0 < result["bound"] < default["bound"] and result["achieved_sparsity"] < default["achieved_sparsity"]


def test_cli_kernels_json_shape(monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", ((32, 64),))
    monkeypatch.setattr(bench, "DTYPES", ("float32",))
    assert main(["bench", "kernels", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"backend", "device", "rows"} and len(report["rows"]) == 3
