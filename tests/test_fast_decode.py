"""The fast decoder (own one-token step, static KV cache, native on the CPU, compiled on a GPU) against the patched
model's HF forward, which test_families holds against the masked reference: the same logits within float rounding,
the same greedy tokens and the same counts of skipped inputs, for every method and every family it covers; native
and compiled against eager. The compile machinery runs on the CPU only where a test asks for it (compiling_on_cpu):
on a GPU it is the fast decoder, on the CPU the native step is."""

import pytest
import torch
import transformers as T

from sparse_core import calibrate, fast_decode, generate, models
from sparse_core.patch import sparsity
from sparse_core.spec import GROUPS, SparsitySpec
from sparse_core.trace import AbsHistogram, SparsityCounter

VOCAB = 96
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
FAMILIES = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}


def _tiny(family: str, layout: str = "inputs", int8: bool = False) -> models.SparseModel:
    torch.manual_seed(3)
    config = FAMILIES[family](**_LLAMA_LIKE)
    config._attn_implementation = "sdpa"
    return models.wrap(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=None, name=f"tiny-{family}",
                       layout=layout, int8=int8)


def _specs(model: models.SparseModel) -> dict:
    generator = torch.Generator().manual_seed(11)
    teal = [[float(v) for v in torch.rand(len(GROUPS), generator=generator) * 0.8] for _ in range(model.num_layers)]
    return {"dense": None, "teal": SparsitySpec.from_tables("teal", teal, model.fingerprint),
            "topk": model.topk_spec(0.5),
            "cats": SparsitySpec.from_tables("cats", [[0.0, 0.0, 0.0, 0.05]] * model.num_layers, model.fingerprint)}


@pytest.fixture
def compiling_on_cpu(monkeypatch):
    """The step compiled on the CPU too, for a model the native step does not take (Qwen2's projection biases): the
    compile machinery a GPU runs, exercised here."""
    monkeypatch.setattr(fast_decode, "COMPILED_DEVICES", ("cuda", "cpu"))


def _hf_logits(model, ids: list[int], spec, counter) -> torch.Tensor:
    with torch.inference_mode(), sparsity(spec, [counter]):
        return model.model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["dense", "teal", "topk", "cats"])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_every_step_matches_the_patched_model_and_counts_alike(family, method, int8):
    model = _tiny(family, int8=int8)
    assert fast_decode.unsupported(model) is None
    spec = _specs(model)[method]
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    fast_counter = SparsityCounter()
    session = fast_decode.Session(fast_decode.decoder(model), spec, 40, compiled=False, observers=[fast_counter],
                                  sparse_prefill=True)  # every position sparse, as HF's forward over the whole prefix
    got = [session.prefill(ids[:8])] + [session.step(token) for token in ids[8:]]  # prompt, then one token at a time
    for step, logits in enumerate(got):
        expected = _hf_logits(model, ids[:8 + step], spec, SparsityCounter())
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    hf = generate.HFSession(model, spec, observers=[SparsityCounter()], sparse_prefill=True)
    with torch.inference_mode():  # the counts of the first decode step: HF's forward of token 8 after the same prefix
        hf.prefill(ids[:8])
        hf.step(ids[8])
    for layer in range(model.num_layers):
        for group in GROUPS:
            assert fast_counter.per_pass[layer, group][0] == hf.observers[0].per_pass[layer, group][0], (layer, group)
    if method != "dense":
        assert 0.05 < fast_counter.weighted(model.skippable_params(method)) < 0.95


@pytest.mark.parametrize("method", ["teal", "topk", "cats"])
def test_a_dense_prefill_leaves_the_prompt_cache_dense_and_the_steps_sparse(method):
    """By default the prompt's KV cache is the dense model's (bit for bit the dense session's, and HF's dense one
    within float rounding), and every decode step matches HF's forward continuing sparse from HF's dense cache."""
    model = _tiny("llama")
    spec = _specs(model)[method]
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    fast = fast_decode.decoder(model)
    sparse, dense = (fast_decode.Session(fast, s, 40, compiled=False) for s in (spec, None))
    assert torch.equal(sparse.prefill(ids[:8]), dense.prefill(ids[:8]))
    assert all(torch.equal(a, b) for a, b in zip(sparse.caches, dense.caches, strict=True))
    hf = generate.HFSession(model, spec)
    with torch.inference_mode():
        hf.prefill(ids[:8])
        for layer, cached in enumerate(hf.cache.layers):
            torch.testing.assert_close(sparse.caches[2 * layer][:, :8], cached.keys[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sparse.caches[2 * layer + 1][:, :8], cached.values[0], rtol=1e-4, atol=1e-5)
        for token in ids[8:]:
            torch.testing.assert_close(sparse.step(token), hf.step(token), rtol=1e-4, atol=1e-5)


def test_what_it_does_not_cover_decodes_with_hf_and_says_why():
    gpt2 = models.wrap(T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
                       tokenizer=None, name="tiny-gpt2")
    assert fast_decode.unsupported(gpt2) == "the fast decoder covers llama, mistral, qwen2, not gpt2"
    assert fast_decode.unsupported(_tiny("llama", "cats")) == "the fast decoder runs the inputs layout, not cats"
    assert fast_decode.decoder(gpt2) is None
    assert fast_decode.observable([SparsityCounter()]) and not fast_decode.observable([AbsHistogram()])


@pytest.mark.parametrize("method", ["dense", "topk", "cats"])
def test_on_the_cpu_nothing_compiles(method, monkeypatch):
    """Every method of a Llama-family model decodes natively on the CPU; one the native step does not take (Qwen2's
    q|k|v biases) decodes through HF's forward, named as such: a stream never waits for a compile here."""
    monkeypatch.setenv("SPARSE_LAB_COMPILE", "1")  # the app's default
    llama, qwen2 = _tiny("llama"), _tiny("qwen2")
    spec = _specs(llama)[method]
    assert fast_decode.step_name(llama, spec) == "native step" and fast_decode.ready(llama, spec, 40)
    assert fast_decode.compile_by_default(llama) and not fast_decode.compiles(llama)
    assert fast_decode.covering(qwen2, _specs(qwen2)[method]) is None
    assert fast_decode.step_name(qwen2, _specs(qwen2)[method]) == "HF forward"
    assert not fast_decode.compile_by_default(qwen2)
    session = fast_decode.Session(fast_decode.decoder(qwen2), _specs(qwen2)[method], 40, compiled=True)
    assert not session.compiled and session.note.startswith("The step is compiled on cuda only")


@pytest.mark.parametrize("method", ["topk", "cats"])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_the_compiled_step_equals_the_eager_one_on_a_tiny_model(method, int8, compiling_on_cpu):
    """The compiled variants (top-k's ranking, CATS' gate mask), on 2 layers, with float and int8 weights (the int8
    op traced into the graph); SmolLM2's test below runs the native step."""
    model = _tiny("qwen2", int8=int8)
    spec = _specs(model)[method]
    ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(9)).tolist()
    runs = {}
    for compiled in (False, True):
        counter = SparsityCounter()
        session = fast_decode.Session(fast_decode.decoder(model), spec, 40, compiled=compiled, observers=[counter])
        runs[compiled] = ([session.prefill(ids[:6])] + [session.step(t) for t in ids[6:]], counter)
        assert session.compiled == compiled and session.note is None
    for eager, compiled in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert runs[False][1].per_pass == runs[True][1].per_pass
    fast = fast_decode.decoder(model)  # compiled once in this process: the next stream starts at once, and the
    assert fast_decode.ready(model, spec, 40)  # first compile's time is on record for the wait's estimate
    assert fast_decode.step_name(model, spec) == "compiled step"
    seconds = fast_decode.compile_seconds_on_record(fast, spec, 40)
    assert seconds is not None and seconds > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("method", ["dense", "teal", "topk", "cats"])
def test_the_native_step_is_the_eager_one(method, dtype, vector_path):
    """Every method on the CPU decodes through sparse_lab::decode_token, one native call a token, nothing to
    compile (top-k ranks each group's inputs and CATS gates the neurons in C++), on every vector path this CPU has:
    its logits are the eager step's (float32 and int8 weights within 1e-5; bfloat16, where both round each op to the
    dtype, within a few bfloat16 steps of the logits), and so are its skip counts."""
    torch.manual_seed(3)
    config = T.LlamaConfig(**_LLAMA_LIKE)
    int8, dtype = dtype == "int8", torch.float32 if dtype == "int8" else dtype
    model = models.wrap(T.AutoModelForCausalLM.from_config(config).to(dtype).eval(), tokenizer=None,
                        name=f"tiny-llama-{dtype}", int8=int8)
    fast = fast_decode.decoder(model)
    spec = _specs(model)[method]
    assert fast.runs_native(fast.step_inputs(spec, "kernel").variant)
    ids = torch.randint(0, VOCAB, (14,), generator=torch.Generator().manual_seed(8)).tolist()
    runs = {}
    for native in (True, False):
        counter = SparsityCounter()
        session = fast_decode.Session(fast, spec, 40, compiled=native, dense_route="kernel", observers=[counter])
        assert session.ready  # nothing to compile
        runs[native] = (torch.stack([session.prefill(ids[:6])] + [session.step(t) for t in ids[6:]]).float(), counter)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05)
    torch.testing.assert_close(runs[True][0], runs[False][0], **tolerance)
    if dtype == torch.float32:
        assert runs[True][1].per_pass == runs[False][1].per_pass
    shares = [c.weighted(model.skippable_params(method)) for _, c in runs.values()]
    assert shares[0] == pytest.approx(shares[1], abs=0.01) and (method == "dense") == (shares[0] < 0.05)


def _hf_steps(model, prompt_ids: list[int], spec, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the patched model's HF forward (dense prefill, then sparse steps with its cache) and the
    logits of every step."""
    session, logits, tokens = generate.HFSession(model, spec), [], []
    with torch.inference_mode():
        logits.append(session.prefill(list(prompt_ids)))
        for _ in range(steps - 1):
            tokens.append(int(logits[-1].argmax()))
            logits.append(session.step(tokens[-1]))
    return tokens + [int(logits[-1].argmax())], torch.stack(logits)


def test_smollm2_decode_step_matches_hf_decoding(smollm2):
    """The step a compiled stream of dense or TEAL runs on the CPU, the native one (nothing compiled, so it starts at
    once). At 0 % it makes HF's greedy tokens. With thresholds a model is discontinuous: rounding that
    differs between two correct computations (here HF's cached attention and the static cache's, HF's SDPA and MKL
    against the step's attention matmuls and lm_head GEMV) flips the inputs that sit at a threshold, a flip moves the
    logits by about threshold x weight, and the flipped step's K/V stay in each cache for every later step. So at
    TEAL 25 % the check is: the dense prefill's logits are HF's (both dense), and the next-token choice on HF's own
    tokens agrees at nearly every step (23 of 24 on an AMD EPYC; at 50 %, where more inputs sit near a threshold,
    19 of 24)."""
    prompt = generate.encode_prompt(smollm2, "Write a haiku about the sea.")
    teal = calibrate.calibrate(smollm2, "teal", 0.25)
    for spec in (None, smollm2.dense_spec(), teal):
        tokens, expected = _hf_steps(smollm2, list(prompt.ids), spec, 24)
        counter = SparsityCounter()
        session = fast_decode.Session(fast_decode.decoder(smollm2), spec, len(prompt.ids) + 24, observers=[counter])
        got = torch.stack([session.prefill(list(prompt.ids))] + [session.step(t) for t in tokens[:-1]])
        assert session.compiled and session.note is None
        agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        assert (got[0] - expected[0]).abs().max() < 1e-3  # the prompt's prefill is dense on both roads
        if spec is None or spec.method == "dense":
            assert agreement == 1.0 and (got - expected).abs().max() < 1e-3
        else:
            assert agreement >= 0.85
            hf_counter = SparsityCounter()
            list(generate.stream(smollm2, prompt, spec, 24, stop_at_eos=False, observers=[hf_counter]))
            shares = [c.weighted(smollm2.skippable_params("teal")) for c in (counter, hf_counter)]
            assert shares[0] == pytest.approx(shares[1], abs=0.01)
    assert fast_decode.step_name(smollm2, teal) == "native step"
    assert fast_decode.ready(smollm2, teal, len(prompt.ids) + 24)  # no compile to wait for


def test_a_failed_compile_decodes_eagerly_and_keeps_the_reason(monkeypatch, compiling_on_cpu):
    model = _tiny("qwen2")
    fast = fast_decode.decoder(model)

    def refuse(*args):
        raise RuntimeError("no C++ compiler here\nmore detail")
    monkeypatch.setattr(fast, "step_function", lambda variant: refuse)
    spec = _specs(model)["teal"]
    session = fast_decode.Session(fast, spec, 40, compiled=True)
    ids = [3, 14, 15, 9, 2]
    logits = [session.prefill(ids[:3])] + [session.step(t) for t in ids[3:]]
    assert not session.compiled and session.failure == "RuntimeError: no C++ compiler here"
    assert session.note == "The compiled step failed (RuntimeError: no C++ compiler here), so this generation decodes uncompiled."
    hf = generate.HFSession(model, spec)
    with torch.inference_mode():
        expected = [hf.prefill(ids[:3])] + [hf.step(t) for t in ids[3:]]
    torch.testing.assert_close(logits[-1], expected[-1], rtol=1e-4, atol=1e-5)
    again = fast_decode.Session(fast, spec, 40, compiled=True)  # the same shape: eager from the start, not compiled again
    assert not again.compiled and again.ready and "compile failed earlier (RuntimeError" in again.note
    assert fast_decode.prepare(model, spec, 40) == again.note


def test_more_shapes_and_methods_than_the_compile_limit_all_complete(monkeypatch, compiling_on_cpu):
    """Four methods x three cache sizes: 12 generations, more than dynamo's recompile limit (8). Dense (TEAL's too),
    top-k and CATS compile a shape per cache size, each variant its own code object, so none reaches the limit;
    every generation runs compiled, and its logits are the eager ones.
    A generation longer than the compiled step's largest cache decodes eagerly and says so in one sentence."""
    monkeypatch.setattr(fast_decode, "CACHE_BUCKET", 16)
    monkeypatch.setattr(fast_decode, "MAX_COMPILED_POSITIONS", 128)
    import torch._dynamo
    assert torch._dynamo.config.recompile_limit == 8
    model = _tiny("qwen2")
    fast = fast_decode.decoder(model)
    specs = _specs(model)
    ids = torch.randint(0, VOCAB, (140,), generator=torch.Generator().manual_seed(1)).tolist()
    shapes = 0
    for positions in (12, 30, 120):  # caches of 16, 32, 128 positions
        for method, spec in specs.items():
            prompt = ids[:positions - 4]  # a different prompt length every time
            runs = {}
            for compiled in (True, False):
                session = fast_decode.Session(fast, spec, positions, compiled=compiled)
                runs[compiled] = [session.prefill(prompt)] + [session.step(t) for t in ids[positions - 4:positions - 1]]
                assert session.compiled == compiled and session.note is None, (method, positions, session.note)
            shapes += 1
            for eager, compiled in zip(runs[False], runs[True]):
                torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert shapes == 12 > torch._dynamo.config.recompile_limit
    long = fast_decode.Session(fast, specs["teal"], 130, compiled=True)
    assert not long.compiled and long.note == ("This generation needs a 256-position cache, more than the 128 the "
                                               "compiled step is built for, so it decodes uncompiled.")
    assert long.prefill(ids[:126]).shape == (VOCAB,)


def test_a_compile_limit_hit_falls_back_for_that_generation_only(monkeypatch, compiling_on_cpu):
    """Should a compile limit be reached anyway (here set to one shape per step), the generation that hits it
    continues eagerly with its reason, and a later generation of a shape already compiled still runs compiled."""
    import torch._dynamo
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = _tiny("qwen2")
    fast = fast_decode.decoder(model)
    spec = _specs(model)["topk"]
    first = fast_decode.Session(fast, spec, 40)
    first.prefill([1, 2, 3])
    first.step(4)
    assert first.compiled
    second = fast_decode.Session(fast, spec, 300)  # another cache size: one compiled shape too many
    logits = [second.prefill([1, 2, 3])] + [second.step(t) for t in (4, 5)]
    assert not second.compiled and "RecompileLimit" in second.note and second.note.endswith("decodes uncompiled.")
    eager = fast_decode.Session(fast, spec, 300, compiled=False)
    expected = [eager.prefill([1, 2, 3])] + [eager.step(t) for t in (4, 5)]
    torch.testing.assert_close(torch.stack(logits), torch.stack(expected), rtol=1e-4, atol=1e-5)
    third = fast_decode.Session(fast, spec, 40)
    third.prefill([1, 2, 3])
    third.step(4)
    assert third.compiled and third.note is None
