"""The CLI end to end on the embedded model: JSON that scripts can rely on, one-line errors."""
import json

import pytest
import torch

from sparse_core import calibrate, metrics
from sparse_core.__main__ import main


def test_eval_json_is_the_one_stored_quality_measurement(smollm2, capsys):
    """`eval --json` by default reports the setting's one measurement: the held-out text's first QUALITY_TOKENS
    tokens, the same figures every page shows (metrics.measured), labelled with the setting."""
    assert main(["eval", "--json", "--method", "teal", "--sparsity", "0.25"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {"ppl_dense", "ppl_sparse", "kl", "top1_agreement", "achieved_sparsity", "weight_reads_skipped", "bound",
            "ppl_increase", "chunk_ppl_increase"} <= row.keys()
    assert (row["spec"], row["dtype"], row["layout"], row["device"]) == ("TEAL 25%", "float32", "inputs", "cpu")
    windows = metrics.QUALITY_TOKENS // 512
    assert (row["protocol"], row["window"], row["held_out_tokens"]) == ("dense-prefill", 512, metrics.QUALITY_TOKENS)
    assert row["tokens"] == windows * (256 - 1)  # each window's second half predicts all but its last token
    assert abs(row["achieved_sparsity"] - 0.25) < 0.05 and row["ppl_sparse"] >= row["ppl_dense"] * 0.98
    shown = metrics.measured(smollm2, calibrate.calibrate(smollm2, "teal", 0.25))
    assert (row["ppl_sparse"], row["kl"], row["weight_reads_skipped"]) == (
        round(shown.ppl_sparse, 4), round(shown.kl, 4), round(shown.weight_reads_skipped, 4))
    assert row["bound"] == pytest.approx(1 / (1 - row["weight_reads_skipped"]), rel=1e-3)


def test_eval_protocol_all_sparse_is_the_measurement_before_dense_prefill(smollm2, capsys):
    """`--protocol all-sparse`: every position of four 256-token windows sparse and scored, stored apart from the
    default protocol's figure and labelled with its own."""
    assert main(["eval", "--json", "--method", "teal", "--sparsity", "0.25", "--protocol", "all-sparse"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["protocol"], row["window"], row["held_out_tokens"], row["tokens"]) == ("all-sparse", 256, 1024, 1020)
    assert row["protocol_label"].startswith("all positions sparse: 1,024 held-out tokens in 256-token windows")
    spec = calibrate.calibrate(smollm2, "teal", 0.25)
    harsh, default = (metrics.measured(smollm2, spec, protocol=p) for p in ("all-sparse", "dense-prefill"))
    assert row["kl"] == round(harsh.kl, 4) and harsh.kl > default.kl  # a sparse prompt cache costs every later token


def test_calibrate_writes_a_spec_that_eval_reads_back(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["calibrate", "--method", "topk", "--sparsity", "0.3", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["method"] == "topk" and len(spec["values"]) == 30
    capsys.readouterr()
    assert main(["generate", "--spec", str(out), "--json", "--max-new-tokens", "4", "--prompt", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 4


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval", "--spec", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The spec is not valid JSON") and "\n" not in err
    assert main(["generate", "--prompt", "   "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    if not torch.cuda.is_available():
        for command in (["info"], ["bench", "kernels", "--quick"]):
            assert main([*command, "--device", "cuda"]) == 2
            assert capsys.readouterr().err.startswith("error: CUDA was asked for, but torch sees no usable CUDA device")


def test_auto_device_is_the_cpu_without_a_gpu(capsys):
    assert main(["info", "--json", "--device", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_bfloat16_loads_and_generates(capsys):
    assert main(["generate", "--dtype", "bfloat16", "--method", "dense", "--json",
                 "--max-new-tokens", "8", "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["text"]


def test_selfcheck_kernel_part_passes_in_the_interpreter_and_can_fail(capsys, monkeypatch):
    """CI runs selfcheck's kernel part on the CPU: the native kernels and the Triton kernels in the interpreter, every
    dtype and int8 rows, batch 1-8 and s in {0, 0.5, 0.9}, against float64. A kernel that is off in one output is
    caught."""
    from sparse_core import selfcheck
    assert main(["selfcheck", "--json", "--parts", "kernels", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and set(report["kernels"]) == {"triton-interpret", "cpu-native", "triton-interpret-int8",
                                                        "cpu-native-int8"}
    assert report["kernels"]["triton-interpret"]["cases"] == len(selfcheck.SHAPES["cpu"]) * 3 * 8 * 3
    assert report["kernels"]["cpu-native-int8"]["cases"] == len(selfcheck.SHAPES["cpu"]) * 1 * 8 * 3
    assert all(r["failed"] == 0 and r["worst_error_over_tolerance"] <= 1 for r in report["kernels"].values())

    from sparse_core.kernels import triton_sparse_gemv
    exact = triton_sparse_gemv.sparse_linear
    def off_by_one_output(*args):
        y = exact(*args)
        y[..., 0] += 1
        return y
    monkeypatch.setattr(triton_sparse_gemv, "sparse_linear", off_by_one_output)
    assert main(["selfcheck", "--json", "--parts", "kernels", "--device", "cpu"]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert not broken["ok"] and broken["kernels"]["triton-interpret"]["failed"] == 144


def test_prepare_leaves_the_first_pages_settings_calibrated_and_measured(smollm2, capsys):
    """`make run` prepares before the server answers: each method at the sidebar's default, its quality stored, so
    the first visitor's page reads them from disk; a second run finds them all."""
    assert main(["prepare"]) == 0
    assert "TEAL, CATS and top-k at 25%" in capsys.readouterr().err
    for method in ("teal", "cats", "topk"):
        assert metrics.stored(smollm2, calibrate.calibrate(smollm2, method, 0.25)) is not None
