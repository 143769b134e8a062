"""Scale: one copy of the weights, long work beside generation, cancellation, and a model split by accelerate."""
import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from sparse_core import calibrate, generate, models, patch, tuning
from sparse_core.patch import sparsity
from sparse_core.trace import SparsityCounter

ROOT = Path(__file__).resolve().parent.parent

MEMORY_PROBE = textwrap.dedent("""
    import json, torch
    from sparse_core import generate, models, ops

    def resident():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

    model = models.load()
    with torch.inference_mode():  # build and load the native kernel outside the measurement
        ops.sparse_linear(torch.randn(1, 64), torch.randn(64, 32).t(), None, 0.5)
    generate.generate(model, "Hello", None, max_new_tokens=4)
    before = resident()
    generate.generate(model, "Hello", model.topk_spec(0.5), max_new_tokens=4)  # every projection's kernel runs
    print(json.dumps(dict(
        growth=resident() - before,
        projection_bytes=sum(sum(p.values()) for p in model.group_params) * 4,
        mapped_weight_files=[l.split()[-1] for l in open("/proc/self/maps") if l.rstrip().endswith(".safetensors")])))
""")


def test_the_process_holds_one_copy_of_the_weights():
    """In a fresh process: the first sparse pass through every kernel allocates no second copy of any weight
    (the earlier cached transposed copy added ~397 MiB here), and the safetensors file is no longer mapped beside the
    re-stored weights."""
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"resident growth on the first sparse pass: {probe['growth'] / 2**20:.1f} MiB "
          f"(projections hold {probe['projection_bytes'] / 2**20:.0f} MiB)")
    assert probe["growth"] < 0.05 * probe["projection_bytes"]
    assert probe["mapped_weight_files"] == []


def test_long_work_runs_beside_generation_and_can_be_cancelled(smollm2):
    """A quality sweep (the longest job a visitor starts) runs in one thread; another visitor's generation,
    started while it runs, finishes long before the sweep would and gets exactly what it gets alone. Then the
    sweep is cancelled and stops at its next step, caching nothing."""
    spec = calibrate.calibrate(smollm2, "teal", 0.25)
    prompt = generate.encode_prompt(smollm2, "Name three rivers in Europe.")
    started = time.perf_counter()
    alone = generate.generate(smollm2, prompt, spec, max_new_tokens=8, stop_at_eos=False)
    alone_s = time.perf_counter() - started

    targets = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55]
    steps, running, cancel, outcome = [], threading.Event(), threading.Event(), {}

    def progress(done, total):
        steps.append(done)
        running.set()

    def long_work():
        try:
            outcome["frame"] = tuning.sweep(smollm2, ["teal"], targets, max_tokens=384, progress=progress, cancel=cancel)
        except tuning.Cancelled:
            outcome["cancelled"] = True

    cached_before = set(tuning._SWEEPS)
    worker = threading.Thread(target=long_work)
    worker.start()
    assert running.wait(timeout=300), "the sweep never reported progress"
    started = time.perf_counter()
    beside = generate.generate(smollm2, prompt, spec, max_new_tokens=8, stop_at_eos=False)
    beside_s = time.perf_counter() - started
    sweep_still_running = worker.is_alive()
    cancel.set()
    worker.join(timeout=300)
    print(f"8 tokens alone {alone_s:.2f} s, beside a running sweep {beside_s:.2f} s ({beside_s / alone_s:.1f}x); "
          f"the sweep stopped after {len(steps)} of {len(targets)} steps")
    assert beside.text == alone.text and [t.id for t in beside.tokens] == [t.id for t in alone.tokens]
    assert sweep_still_running and not worker.is_alive()
    assert outcome == {"cancelled": True} and len(steps) < len(targets)
    assert set(tuning._SWEEPS) == cached_before  # no half sweep cached


def test_sweep_results_are_cached_up_to_a_limit(smollm2):
    """Asking again returns the cached table; many different sweeps keep only the newest MAX_CACHED_SWEEPS."""
    run = lambda target: tuning.sweep(smollm2, ["topk"], [target], max_tokens=16)
    first = run(0.1)
    assert run(0.1) is first
    for step in range(tuning.MAX_CACHED_SWEEPS + 2):
        run(0.2 + step / 100)
        assert len(tuning._SWEEPS) <= tuning.MAX_CACHED_SWEEPS
    assert run(0.1) is not first  # the oldest was dropped and is computed again


@pytest.fixture(scope="module")
def tiny_llama(smollm2):
    """A tiny random Llama with SmolLM2's tokenizer: a whole sweep, greedy allocation included, in seconds."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(11)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2.tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True)
    return models.wrap(AutoModelForCausalLM.from_config(config), tokenizer=smollm2.tokenizer, name="tiny-sweep-llama")


def test_a_sweep_reports_progress_from_its_greedy_phase_to_its_last_point(tiny_llama):
    """One done/total over the whole sweep: greedy allocation's steps (histogram, each block, each target's
    thresholds) move it before any point is measured, every point moves it once more, and it ends at (total, total);
    each point reaches on_point as it is finished."""
    targets, events = [0.3, 0.5], []
    frame = tuning.sweep(tiny_llama, ["teal"], targets, ["uniform", "greedy"], max_tokens=64,
                         progress=lambda done, total: events.append(("progress", done, total)),
                         on_point=lambda point: events.append(("point", point)))
    greedy = tuning.greedy_steps(tiny_llama, "teal", targets)
    total = greedy + 4
    reports = [e[1:] for e in events if e[0] == "progress"]
    assert {t for _, t in reports} == {total} and reports[-1] == (total, total)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)  # it never goes back
    first_point = next(i for i, e in enumerate(events) if e[0] == "point")
    before = [e[1] for e in events[:first_point] if e[0] == "progress" and e[1] > 0]
    assert before[0] == 1 and before[-1] >= greedy  # the bar moved through the greedy phase first
    points = [e[1] for e in events if e[0] == "point"]
    assert len(points) == len(frame) == 4 and tuning.points_frame(points).equals(frame)
    calls = []
    assert tuning.sweep(tiny_llama, ["teal"], targets, ["uniform", "greedy"], max_tokens=64,
                        progress=lambda *a: calls.append(a)) is frame and calls == []  # cached: back at once


def test_a_cancelled_sweep_keeps_its_finished_points_and_caches_nothing(tiny_llama):
    cancel, points = threading.Event(), []

    def finished(point):
        points.append(point)
        cancel.set()  # stop after the first point

    cached_before = set(tuning._SWEEPS)
    with pytest.raises(tuning.Cancelled):
        tuning.sweep(tiny_llama, ["teal", "topk"], [0.2, 0.4], max_tokens=64, cancel=cancel, on_point=finished)
    assert len(points) == 1 and (points[0].method, points[0].target) == ("teal", 0.2)
    assert set(tuning._SWEEPS) == cached_before  # no half sweep cached
    partial = tuning.points_frame(points)
    assert len(partial) == 1 and list(partial.columns) == [f.name for f in dataclasses.fields(tuning.SweepPoint)]
    assert len(tuning.sweep(tiny_llama, ["teal", "topk"], [0.2, 0.4], max_tokens=64)) == 4  # asked again: recomputed


def test_a_sweep_job_runs_in_its_thread_stops_on_request_and_reports_errors_in_one_sentence(tiny_llama):
    """What the Quality page holds: the sweep runs in a background thread; stop() ends it at its next step with the
    points finished so far (uncached); a bad text fails it with one sentence; a whole sweep finishes with its table."""
    cached_before = set(tuning._SWEEPS)
    job = tuning.start_sweep(tiny_llama, ["teal", "topk"], [0.15, 0.35, 0.55], ["uniform"], max_tokens=64)
    assert job.running and job.planned == 6 and job.thread.name == "quality-sweep"
    deadline = time.monotonic() + 120
    while not job.points and job.running and time.monotonic() < deadline:
        time.sleep(0.01)
    job.stop()
    assert job.wait(timeout=120)
    assert job.state == "stopped" and job.error is None and 0 < len(job.frame) == len(job.points) < job.planned
    assert set(tuning._SWEEPS) == cached_before

    failed = tuning.start_sweep(tiny_llama, ["topk"], [0.5], text="   ", max_tokens=64)
    assert failed.wait(timeout=120) and failed.state == "failed" and failed.frame is None
    assert failed.error == "The text is empty; give some text to calibrate or evaluate on."

    whole = tuning.start_sweep(tiny_llama, ["topk"], [0.25, 0.45], max_tokens=64)
    assert whole.wait(timeout=120) and whole.state == "finished"
    assert len(whole.frame) == 2 and (whole.done, whole.total) == (2, 2) and whole.seconds_left() is None


def test_a_progress_callback_that_raises_stops_calibration_and_leaves_no_cache(smollm2):
    """How the app stops work (Streamlit raises from the next progress update when the visitor moves on): the
    error propagates out of calibration, nothing is cached, and the next call calibrates from scratch."""
    text = "A short text of our own, so that no cached calibration exists for it. " * 20

    def stop(done, total):
        raise tuning.Cancelled("Cancelled.")

    path = calibrate.calibration_cache_path(smollm2, "teal", [[0.33] * 4] * smollm2.num_layers, text, 1)
    path.unlink(missing_ok=True)  # left by an earlier run of this test
    with pytest.raises(tuning.Cancelled):
        calibrate.calibrate(smollm2, "teal", 0.33, text=text, progress=stop)
    assert not path.exists()
    spec = calibrate.calibrate(smollm2, "teal", 0.33, text=text)
    assert path.exists() and spec.method == "teal"


def test_a_model_split_by_accelerate_over_memory_and_disk_runs_every_method(smollm2, tmp_path, monkeypatch):
    """A tiny Llama (with SmolLM2's tokenizer) loaded whole and with accelerate's device_map putting half of its
    blocks on disk: every method gives the whole model's logits, the offloaded linears run the sparse path on
    weights their hook brings in for the call, and generation works end to end."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(5)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2.tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
                 "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")  # the offloaded weights go with tmp_path
    whole = models.load(str(tmp_path))
    split = models.load(str(tmp_path), device_map=placement)
    offloaded = patch.decoder_layers(split.model)[3].self_attn.q_proj.weight
    assert split.model.hf_device_map["model.layers.3"] == "disk" and offloaded.device.type == "meta"
    assert split.fingerprint == whole.fingerprint

    ids = torch.tensor([generate.encode_prompt(whole, "Tell me about the sea.").ids])
    for spec in (None, whole.topk_spec(0.5), calibrate.calibrate(whole, "teal", 0.5), calibrate.calibrate(whole, "cats", 0.5)):
        counter = SparsityCounter()
        with torch.inference_mode(), sparsity(spec):
            expected = whole.model(ids).logits
        with torch.inference_mode(), sparsity(spec, [counter]):
            got = split.model(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if spec is not None:  # the offloaded blocks did skip inputs
            assert counter.fraction(3, "mlp_mid") > 0.2
    alone = generate.generate(whole, "Tell me about the sea.", whole.topk_spec(0.5), max_new_tokens=6, stop_at_eos=False)
    assert generate.generate(split, "Tell me about the sea.", whole.topk_spec(0.5), max_new_tokens=6,
                             stop_at_eos=False).text == alone.text
