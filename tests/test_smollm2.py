"""The real embedded SmolLM2-135M-Instruct: identity at 0 %, calibration on held-out text, coherent generation,
metrics, and two threads generating with different specs at once."""
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernel_reference import in_kernel_layout
from sparse_core import calibrate, generate, gguf, metrics, models
from sparse_core.patch import sparsity
from sparse_core.spec import GROUPS, SpecError

QUESTION = "What is the capital of France?"


def test_zero_sparsity_matches_plain_hf_logits_and_tokens(smollm2):
    """On the "linear" dense route, exactly HF's own forward on the same weight storage; against a freshly loaded HF
    model (its weights in HF's layout, so the BLAS sums in another order) within float32 rounding, with the same
    greedy tokens, on either dense route."""
    pristine = AutoModelForCausalLM.from_pretrained(gguf.default_model_dir(), dtype=torch.float32).eval()
    zero = calibrate.calibrate(smollm2, "teal", 0.0)
    prompt = generate.encode_prompt(smollm2, QUESTION)
    ids = torch.tensor([prompt.ids])
    ours = [t.id for t in generate.stream(smollm2, prompt, zero, max_new_tokens=12, dense_route="linear")]
    kernel_route = [t.id for t in generate.stream(smollm2, prompt, zero, max_new_tokens=12, dense_route="kernel")]
    with torch.no_grad(), sparsity(zero, dense_route="linear"):
        logits = smollm2.model(ids).logits
    with torch.no_grad():
        fresh = pristine(ids).logits
        fresh_tokens = pristine.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        plain = in_kernel_layout(pristine)  # the same model, re-stored as the patched one is
        assert torch.equal(logits, plain(ids).logits)
        plain_tokens = plain.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    torch.testing.assert_close(logits, fresh, rtol=0, atol=1e-3)
    assert ours == plain_tokens == fresh_tokens == kernel_route


@pytest.mark.parametrize("method, target", [("teal", 0.25), ("teal", 0.5), ("cats", 0.5), ("topk", 0.4)])
def test_calibrated_target_holds_on_held_out_text(smollm2, method, target):
    spec = calibrate.calibrate(smollm2, method, target)
    result = metrics.evaluate(smollm2, spec, max_tokens=768)  # the evaluation text, never seen by calibration
    if method == "cats":  # CATS skips MLP neurons only: check the intermediate's own sparsity
        reached = sum(result.per_layer_sparsity) / len(result.per_layer_sparsity)
        params = smollm2.skippable_params("cats")
        mlp_share = sum(p["mlp_mid"] for p in params) / sum(sum(p.values()) for p in params)
        assert reached == pytest.approx(target * mlp_share, abs=0.03)
    else:
        assert result.achieved_sparsity == pytest.approx(target, abs=0.03)
    assert result.ppl_sparse > result.ppl_dense
    assert 0 < result.kl and 0.3 < result.top1_agreement < 1


@pytest.mark.parametrize("protocol", sorted(metrics.PROTOCOLS))
def test_zero_sparsity_costs_nothing_under_either_protocol(smollm2, protocol):
    """At 0 % the sparse predictions are the dense ones, and the dense perplexity is plain HF's over the same scored
    positions: the whole window (all-sparse), or the second half after the first as context (dense-prefill)."""
    how = metrics.PROTOCOLS[protocol]
    result = metrics.evaluate(smollm2, calibrate.calibrate(smollm2, "teal", 0.0), max_tokens=how.window,
                              protocol=protocol)
    assert result.kl == 0 and result.top1_agreement == 1 and result.ppl_sparse == result.ppl_dense
    assert result.weight_reads_skipped < 1e-3  # only exact zeros (at most a few inputs) count as skipped
    pristine = AutoModelForCausalLM.from_pretrained(gguf.default_model_dir(), dtype=torch.float32).eval()
    ids = smollm2.tokenizer(calibrate.default_text("evaluation"), add_special_tokens=False,
                            return_tensors="pt")["input_ids"][:, :how.window]
    context = how.context(how.window)
    with torch.no_grad():
        logits = pristine(ids).logits[0, context:-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, context + 1:])
    assert result.tokens == how.window - context - 1
    assert result.ppl_dense == pytest.approx(float(nll.exp()), rel=1e-4)


def test_a_generation_prefills_dense_and_decodes_sparse(smollm2):
    """The prompt's KV cache of a sparse generation is the dense model's, bit for bit, unless it asks for a sparse
    prefill; its decode steps run the spec, and only they are counted."""
    from sparse_core.trace import SparsityCounter
    spec = calibrate.calibrate(smollm2, "teal", 0.5)
    ids = list(generate.encode_prompt(smollm2, QUESTION).ids)
    counter = SparsityCounter()
    session = generate.HFSession(smollm2, spec, observers=(counter,))
    with torch.inference_mode():
        first = session.prefill(ids)
        dense = smollm2.model(torch.tensor([ids]), use_cache=True)  # no sparsity context: the dense model
    assert torch.equal(first, dense.logits[0, -1])
    for ours, theirs in zip(session.cache.layers, dense.cache.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert not counter.total  # the prefill is not counted
    with torch.inference_mode():
        step = session.step(int(first.argmax()))
    assert len(counter.per_pass[0, "mlp_in"]) == 1 and 0.35 < counter.weighted(smollm2.skippable_params("teal")) < 0.65
    with torch.inference_mode(), sparsity(spec):
        expected = smollm2.model(torch.tensor([[int(first.argmax())]]), cache=dense.cache, use_cache=True).logits[0, -1]
    assert torch.equal(step, expected)  # the step is the sparse model's, continuing from the dense cache
    thresholded = generate.HFSession(smollm2, spec, sparse_prefill=True)
    with torch.inference_mode():
        thresholded.prefill(ids)
    assert not torch.equal(thresholded.cache.layers[1].keys, session.cache.layers[1].keys[:, :, :len(ids)])


def test_generates_coherent_text_dense_and_at_25_percent(smollm2):
    dense = generate.generate(smollm2, QUESTION, max_new_tokens=24)
    sparse = generate.generate(smollm2, QUESTION, calibrate.calibrate(smollm2, "teal", 0.25), max_new_tokens=24)
    assert "Paris" in dense.text and "Paris" in sparse.text
    assert dense.tokens_per_second > 0


def test_seeded_sampling_is_reproducible(smollm2):
    run = lambda seed: [t.id for t in generate.generate(smollm2, "Tell me a story.", max_new_tokens=10, temperature=0.9, seed=seed).tokens]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_two_threads_with_different_specs_get_what_each_gets_alone(smollm2):
    specs = [calibrate.calibrate(smollm2, "teal", 0.5), smollm2.topk_spec(0.3), None, smollm2.topk_spec(0.6)]
    prompt = generate.encode_prompt(smollm2, "Translate into French: the cat sleeps on the warm mat.")
    run = lambda spec: [t.id for t in generate.stream(smollm2, prompt, spec, max_new_tokens=10, stop_at_eos=False)]
    alone = [run(spec) for spec in specs]
    assert len({tuple(a) for a in alone}) > 1  # the specs really differ in what they produce
    together, barrier = [None] * len(specs), threading.Barrier(len(specs))

    def worker(i):
        barrier.wait()
        together[i] = run(specs[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_wrong_model_spec_is_refused(smollm2):
    spec = smollm2.topk_spec(0.3)
    foreign = spec.from_tables("teal", spec.values, "another-model-000")
    with pytest.raises(SpecError, match="made for model another-model-000"):
        generate.generate(smollm2, QUESTION, foreign, max_new_tokens=2)


def test_trace_reports_per_token_sparsity_and_activations(smollm2):
    from sparse_core.trace import Trace
    spec = calibrate.calibrate(smollm2, "teal", 0.5)
    trace = Trace(activation_layer=3)
    result = generate.generate(smollm2, QUESTION, spec, max_new_tokens=6, observers=(trace,), stop_at_eos=False)
    frame = trace.skipped_frame()
    assert set(frame.group) == set(GROUPS) and frame.layer.nunique() == smollm2.num_layers
    assert frame.groupby(["layer", "group"]).size().eq(len(result.tokens) - 1).all()  # the decode steps, not the prompt
    assert 0.4 < frame.skipped.mean() < 0.6
    acts, thresholds = trace.activation_matrix()
    assert acts.shape == (len(result.tokens) - 1, 1536)
    assert torch.all(thresholds == spec.value(3, "mlp_mid"))


def test_unknown_model_is_one_clear_sentence(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no such folder") as missing:
        models.load(str(tmp_path / "nope"))
    with pytest.raises(models.ModelLoadError, match="not a Hugging Face model folder"):
        models.load(str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="Could not find model 'no-such-org/no-such-model'"):
        models.load("no-such-org/no-such-model")
    assert "\n" not in str(missing.value)


def test_corrupt_calibration_cache_is_rebuilt_not_loaded(smollm2):
    good = calibrate.calibrate(smollm2, "teal", 0.25)
    table = [[0.25] * len(GROUPS)] * smollm2.num_layers
    path = calibrate.calibration_cache_path(smollm2, "teal", table, calibrate.default_text("calibration"), 1)
    path.write_text('{"version": 1, "method": "teal", "values": [[0.1')  # a half-written file
    assert calibrate.calibrate(smollm2, "teal", 0.25).values == good.values
    assert calibrate.SparsitySpec.from_json(path.read_text()).values == good.values


def test_a_model_too_big_for_memory_is_refused_before_loading(smollm2):
    folder = str(gguf.default_model_dir())
    need = models.estimate_bytes(folder, "float32")
    assert need == sum(p.numel() for p in smollm2.model.parameters()) * 4
    assert models.estimate_bytes(folder, "bfloat16") == need // 2
    with pytest.raises(models.ModelLoadError, match=r"needs about 0\.5 GiB for its float32 weights but only 0\.1 GiB"):
        models.check_fits(folder, "float32", available=100 * 2**20)
    models.check_fits(folder, "float32", available=8 * 2**30)


def test_quality_is_measured_once_per_setting_and_comes_back_from_disk(smollm2, tmp_path, monkeypatch):
    """metrics.measured evaluates a setting once, keeps it on disk, and from then on every caller gets exactly that
    measurement; the overall perplexity change lies within the spread of its chunks."""
    spec = calibrate.calibrate(smollm2, "teal", 0.4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = metrics.measured(smollm2, spec, max_tokens=1024)
    assert first == metrics.evaluate(smollm2, spec, max_tokens=1024)
    monkeypatch.setattr(metrics, "evaluate", lambda *args, **kwargs: pytest.fail("measured twice"))
    assert metrics.measured(smollm2, spec, max_tokens=1024) == first
    assert metrics.stored(smollm2, spec, max_tokens=1024, protocol="all-sparse") is None  # another protocol: not this
    chunks = first.chunk_ppl_increase
    assert first.tokens == 2 * 255 and len(chunks) == 2 and first.held_out_tokens == 1024
    assert min(chunks) <= first.ppl_increase <= max(chunks)
    assert first.bound == pytest.approx(1 / (1 - first.weight_reads_skipped))


def _huge_page_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_the_weights_sit_on_huge_pages(smollm2):
    """Where Linux offers transparent huge pages, a loaded model's weights are backed by 2 MiB pages (a token
    streams every weight once: no page walk per 4 KiB): the embedding's and a projection's mappings hold some."""
    policy = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform != "linux" or not policy.exists() or "[never]" in policy.read_text():
        pytest.skip("this kernel offers no transparent huge pages")
    projection = next(m for m in smollm2.model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() > 1 << 19)
    for weight in (smollm2.model.get_input_embeddings().weight, projection.weight):
        assert _huge_page_kib(weight.data_ptr()) >= 2048
