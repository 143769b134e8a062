"""The benchmarks' bookkeeping on tiny settings: the honest dense (fastest of three, named), spreads, flags and the
stored measurement. No timing assertions: timings vary by machine."""
import json

import numpy as np
import pytest

from sparse_core import bench, calibrate, cost, models
from sparse_core.__main__ import main

ROW_KEYS = {"out_features", "in_features", "dtype", "sparsity", "hf_dense_ms", "linear_dense_ms", "kernel_dense_ms",
            "dense_path", "dense_ms", "dense_iqr_ms", "sparse_ms", "sparse_iqr_ms", "speedup", "bound", "dense_gbs",
            "sparse_gbs", "bandwidth_gbs", "dense_fraction_of_limit", "sparse_fraction_of_limit", "flag"}


def test_kernel_rows_compare_against_the_fastest_of_three_dense_products():
    seen = []
    rows = bench.kernel_rows(shapes=((48, 80),), dtypes=("float32", "bfloat16"), sparsities=(0.0, 0.5), repeats=3,
                             progress=lambda done, total: seen.append((done, total)))
    assert [(r["dtype"], r["sparsity"]) for r in rows] == [("float32", 0.0), ("float32", 0.5), ("bfloat16", 0.0), ("bfloat16", 0.5)]
    for r in rows:
        assert set(r) == ROW_KEYS
        candidates = {path: r[f"{path}_dense_ms"] for path in bench.DENSE_PATHS}
        assert r["dense_ms"] == min(candidates.values()) and candidates[r["dense_path"]] == r["dense_ms"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"], rel=0.05)  # ms rounded to 0.1 us
        assert r["dense_iqr_ms"] >= 0 and r["sparse_iqr_ms"] >= 0
        assert r["flag"] is None or r["flag"].startswith(("noisy", "invalid"))
        weight_bytes = 48 * 80 * (4 if r["dtype"] == "float32" else 2)  # dense reads it all, sparse 1/bound of it
        assert r["dense_gbs"] == pytest.approx(weight_bytes / r["dense_ms"] / 1e6, rel=0.02)
        assert r["sparse_gbs"] == pytest.approx(weight_bytes / r["bound"] / r["sparse_ms"] / 1e6, rel=0.02)
        assert r["dense_fraction_of_limit"] == pytest.approx(r["dense_gbs"] / r["bandwidth_gbs"], abs=2e-3)
    assert rows[1]["bound"] == 2.0 and seen[-1] == (4, 4)


def test_read_bandwidth_is_a_plausible_memory_rate():
    gbs = bench.read_bandwidth_gbs(repeats=2)
    assert 0.5 < gbs < 2000  # GB/s: any machine's memory, not a cache (1 GiB) nor a broken timer


def test_a_rate_above_the_measured_bandwidth_is_flagged_not_presented():
    steady = bench.Timing(1.0, 0.99, 1.01)
    assert bench.flag(1.5, 2.0, steady, steady, gbs=30.0, limit=31.0) is None
    why = bench.flag(1.5, 2.0, steady, steady, gbs=40.0, limit=31.0)
    assert why.startswith("invalid: 40.0 GB/s is above the measured read bandwidth 31.0 GB/s")


def test_timing_quartiles_match_numpy():
    seconds = [0.010, 0.012, 0.011, 0.030, 0.009, 0.010, 0.013]
    timing = bench.Timing.of(seconds)
    q1, median, q3 = np.percentile(seconds, [25, 50, 75]) * 1e3
    assert (timing.q1, timing.median, timing.q3) == pytest.approx((q1, median, q3))
    assert timing.spread == pytest.approx((q3 - q1) / median)


def test_a_speedup_above_its_bound_or_with_a_wide_spread_is_flagged():
    calm, busy = bench.Timing(10.0, 9.8, 10.2), bench.Timing(10.0, 7.0, 13.0)
    assert bench.flag(1.9, 2.0, calm, calm) is None
    assert bench.flag(2.0 * 1.05, 2.0, calm) is None  # at 1.05 x the bound: still within
    assert bench.flag(2.2, 2.0, calm, calm).startswith("invalid: x2.20 is above the bound x2.00")
    assert bench.flag(1.5, 2.0, calm, busy).startswith("noisy: interquartile range 60%")
    assert bench.flag(3.0, 2.0, busy).startswith("invalid")  # above the bound outranks noise


def test_paired_rates_compare_the_same_decode_steps_and_flag_the_impossible():
    from sparse_core.generate import Token
    steps = lambda *seconds: [Token(0, "", s) for s in seconds]
    dense = steps(5.0, 0.10, 0.10, 0.12, 0.10, 0.10)   # prefill first, then five decode steps
    sparse = steps(4.0, 0.08, 0.09, 0.08)               # stopped early: three decode steps
    rates = bench.paired_rates(dense, sparse)
    assert rates.steps == 3  # only the steps both made, prefill left out
    assert rates.dense == pytest.approx(10.0) and rates.sparse == pytest.approx(12.5)
    assert rates.speedup == pytest.approx(1.25) and rates.flag(bound=1.25) is None
    assert rates.flag(bound=1.1).startswith("invalid")
    assert bench.paired_rates(steps(1.0), sparse) is None


@pytest.fixture(scope="module")
def plain_hf():
    return models.load(layout="hf")


def test_decode_result_is_against_the_fastest_dense_and_is_the_stored_measurement(smollm2, plain_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the user's stored measurements stay untouched
    spec = calibrate.calibrate(smollm2, "teal", 0.5)
    assert bench.stored_decode(smollm2, spec) is None
    result = bench.decode_result(smollm2, spec, new_tokens=3, repeats=2, plain=plain_hf)
    assert set(result["dense_candidates_tok_s"]) == {"hf", "linear", "kernel"}
    assert result["dense_tok_s"] == max(result["dense_candidates_tok_s"].values())
    assert result["dense_candidates_tok_s"][result["dense_path"]] == result["dense_tok_s"]
    assert result["plain_hf_tok_s"] == result["dense_candidates_tok_s"]["hf"]
    assert result["speedup_iqr"][0] <= result["speedup"] <= result["speedup_iqr"][1]  # the median of the paired ratios
    assert (result["method"], result["spec"], result["layout"], result["dtype"]) == ("teal", "TEAL 50%", "inputs", "float32")
    assert 1.5 < result["bound"] < 1.8 and result["bound"] == pytest.approx(1 / (1 - result["weight_reads_skipped"]), rel=1e-3)
    assert result["flag"] is None or result["flag"].startswith(("noisy", "invalid"))
    kept = bench.stored_decode if result["flag"] is None else bench.flagged_decode
    assert kept(smollm2, spec) == json.loads(json.dumps(result))  # what every page reads back
    total, sparsifiable = cost.model_bytes(smollm2)
    assert 0.6 < sparsifiable / total < 0.9  # the tied head/embedding is read once per token and not sparsified
    assert result["weight_bytes_per_token"] == total  # 538 MB in float32
    assert result["sparse_weight_bytes_per_token"] == pytest.approx(total / result["bound"], rel=1e-3)
    for run in ("dense", "sparse"):  # achieved GB/s over measured GB/s
        bytes_per_token = result["weight_bytes_per_token" if run == "dense" else "sparse_weight_bytes_per_token"]
        achieved = result[f"{run}_tok_s"] * bytes_per_token / 1e9
        assert result[f"{run}_fraction_of_limit"] == pytest.approx(achieved / result["bandwidth_gbs"], abs=2e-3)


def test_a_flagged_decode_measurement_is_never_stored_as_the_result(smollm2, tmp_path, monkeypatch):
    """A busy machine's measurement is kept aside (the pages say it was flagged), never drawn as the setting's speed;
    the next valid one becomes the result and clears it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = smollm2.topk_spec(0.5)
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: "noisy: interquartile range 40% of the median (the machine was busy)")
    flagged = bench.decode_result(smollm2, spec, new_tokens=2, repeats=1)
    assert flagged["flag"].startswith("noisy")
    assert bench.stored_decode(smollm2, spec) is None and bench.flagged_decode(smollm2, spec) == flagged
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: None)
    valid = bench.decode_result(smollm2, spec, new_tokens=2, repeats=1)
    assert bench.stored_decode(smollm2, spec) == valid and bench.flagged_decode(smollm2, spec) is None
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: "invalid: x9.00 is above the bound x2.00 (an unfair baseline or noise)")
    bench.decode_result(smollm2, spec, new_tokens=2, repeats=1)
    assert bench.stored_decode(smollm2, spec) == valid  # a later flagged attempt leaves the valid result standing
    assert bench.flagged_decode(smollm2, spec)["flag"].startswith("invalid")


def test_decode_bound_in_the_cats_layout_leaves_out_up(smollm2, tmp_path, monkeypatch):
    """TEAL reads all of up in the cats layout, so its bound and measured skipped share count only the rest."""
    cats = models.load(layout="cats")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # after loading: the converted model stays where it is
    result = bench.decode_result(cats, calibrate.calibrate(cats, "teal", 0.5), new_tokens=3, repeats=1)
    default = bench.decode_result(smollm2, calibrate.calibrate(smollm2, "teal", 0.5), new_tokens=3, repeats=1)
    assert 1.0 < result["bound"] < default["bound"]
    assert result["weight_reads_skipped"] < default["weight_reads_skipped"]
    assert set(result["dense_candidates_tok_s"]) == {"linear", "kernel"}  # no plain model given


def test_cli_kernels_json_shape(monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", ((32, 64),))
    monkeypatch.setattr(bench, "DTYPES", ("float32",))
    assert main(["bench", "kernels", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"backend", "device", "bandwidth_gbs", "rows"} and len(report["rows"]) == 3
    assert all(set(r) == ROW_KEYS for r in report["rows"])


def test_token_profile_accounts_for_every_weight_byte_of_the_native_step(smollm2, capsys):
    """Dense, the gathers read every projection's rows (but an input exactly zero's) and the head its whole matrix;
    TEAL 50 % reads about half the projections' rows; thread 0's phases fit inside the token's wall time."""
    assert main(["bench", "profile", "--json", "--new-tokens", "3", "--repeats", "1", "--sparsity", "0.5"]) == 0
    dense, teal = json.loads(capsys.readouterr().out)
    assert (dense["spec"], teal["spec"]) == ("dense", "TEAL 50%")
    total, sparsifiable = cost.model_bytes(smollm2)
    gathers = lambda result: sum(r["bytes"] for r in result["rows"] if r["phase"].endswith("gather"))
    head = lambda result: next(r["bytes"] for r in result["rows"] if r["phase"] == "lm_head")
    config = smollm2.model.config
    assert 0.999 * sparsifiable < gathers(dense) <= sparsifiable
    assert head(dense) == head(teal) == config.vocab_size * config.hidden_size * 4  # float32, tied: no second copy
    assert 0.3 < gathers(teal) / sparsifiable < 0.7
    for result in (dense, teal):
        assert result["tokens"] == 3 and all(r["ms"] > 0 for r in result["rows"])  # the last row: the wall's remainder
        assert sum(r["ms"] for r in result["rows"]) == pytest.approx(result["ms"], rel=1e-3)
        for r in result["rows"]:
            if "gbs" in r:
                assert r["gbs"] == pytest.approx(r["bytes"] / r["ms"] / 1e6, rel=1e-2)


def test_token_profile_says_in_one_sentence_what_it_cannot_time():
    import transformers as T
    from sparse_core import models, token_profile
    config = T.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96)  # q|k|v biases: not the native step's
    qwen2 = models.wrap(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=None, name="tiny-qwen2")
    with pytest.raises(ValueError, match=r"^bench profile times the native decode step[^.]*\.$"):
        token_profile.profile(qwen2, qwen2.topk_spec(0.5), new_tokens=1, repeats=1)
