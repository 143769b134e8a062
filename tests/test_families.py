"""Every supported family, as a tiny random model built here, through every method, against an independent
reference: the unpatched HF model with forward hooks that mask each projection's input the way the method says.

The reference stores its block linears in the kernels' (in, out) layout, as the patched model does (one copy of
the weights); a pristine copy in HF's own layout checks that the layout changes nothing beyond float rounding."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

from kernel_reference import in_kernel_layout
from sparse_core import kernels, models, ops, patch
from sparse_core.patch import SparseLinear, sparsity
from sparse_core.spec import GROUPS, SparsitySpec
from sparse_core.trace import AbsHistogram, SparsityCounter

VOCAB = 96
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: T.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: T.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**_LLAMA_LIKE, head_dim=16),
    "gemma3": lambda: T.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                 bos_token_id=0, eos_token_id=0),
    "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64,
                               bos_token_id=0, eos_token_id=0, pad_token_id=1),
}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"}
_GROUP_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "c_attn": "attn_in",
             "o_proj": "attn_out", "out_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
             "c_fc": "mlp_in", "fc1": "mlp_in", "down_proj": "mlp_mid", "fc2": "mlp_mid"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    pristine = _tiny(request.param, seed=1234)
    patched = models.wrap(copy.deepcopy(pristine), tokenizer=None, name=f"tiny-{request.param}")
    return request.param, in_kernel_layout(copy.deepcopy(pristine)), patched, pristine


def _tiny(name, seed):
    """A tiny random model of the family, eager attention, seeded."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    return T.AutoModelForCausalLM.from_config(config).eval()


def _reference_hooks(reference, spec):
    """Mask inputs with plain torch ops on the unpatched model: the oracle for the sparse path."""
    handles, gate_out = [], {}
    blocks = patch.decoder_layers(reference)
    for layer, block in enumerate(blocks):
        for name, module in block.named_modules():
            parent, _, leaf = name.rpartition(".")
            group = ("attn_out" if "attn" in parent else "mlp_mid") if leaf == "c_proj" else _GROUP_OF.get(leaf)
            if leaf == "act_fn" and spec.method == "cats":
                handles.append(module.register_forward_hook(lambda m, i, o, layer=layer: gate_out.__setitem__(layer, o)))
            if group is None:
                continue

            def mask(module, args, layer=layer, group=group):
                (x,) = args
                value = spec.value(layer, group)
                if spec.method == "teal":
                    return (x * (x.abs() > value),)
                if spec.method == "topk":
                    keep = round((1 - value) * x.shape[-1])  # ties with the k-th value are kept together
                    kth = x.abs().topk(keep, dim=-1).values[..., -1:]
                    return (x * (x.abs() >= kth),)
                if spec.method == "cats" and group == "mlp_mid":
                    return (x * (gate_out[layer].abs() > value),)
                return None
            handles.append(module.register_forward_pre_hook(mask))
    return handles


def _random_spec(patched, method, generator):
    """Thresholds at random per-(layer, group) targets in [0.1, 0.8], measured on random tokens."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    histogram = AbsHistogram()
    observing = SparsitySpec.from_tables("cats", patched.dense_spec().values, patched.fingerprint) if method == "cats" else None
    with torch.no_grad(), sparsity(observing, [histogram]):
        patched.model(ids)
    targets = (torch.rand(patched.num_layers, len(GROUPS), generator=generator) * 0.7 + 0.1).tolist()
    if method == "topk":
        return SparsitySpec.from_tables("topk", targets, patched.fingerprint)
    values = [[histogram.quantile(l, g, t) for g, t in zip(GROUPS, row)] for l, row in enumerate(targets)]
    return SparsitySpec.from_tables(method, values, patched.fingerprint)


def _masked_reference_logits(reference, spec, ids):
    """The oracle: the unpatched model's logits with each projection's input masked by forward hooks."""
    handles = _reference_hooks(reference, spec)
    try:
        return _logits(reference, ids)
    finally:
        for h in handles:
            h.remove()


def _logits(model, ids, spec=None, observers=(), dense_route=None):
    """Prefill on ids[:, :-2], then two cached decode steps: covers both paths."""
    with torch.no_grad(), sparsity(spec, observers, dense_route):
        out = model(ids[:, :-2], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in (-2, -1):
            out = model(ids[:, t:t + 1 if t != -1 else None], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


def test_zero_sparsity_is_exactly_hf(family):
    """On the "linear" dense route a patched model at 0 % is HF's own forward on the same storage, bit for bit; the
    "kernel" route (every row gathered) agrees within float32 rounding, so either may be the model's measured one."""
    _, reference, patched, pristine = family
    ids = torch.randint(0, VOCAB, (3, 12))
    zero = SparsitySpec.from_tables("teal", patched.dense_spec().values, patched.fingerprint)
    expected = _logits(reference, ids)
    assert torch.equal(_logits(patched.model, ids, zero, dense_route="linear"), expected)
    assert torch.equal(_logits(patched.model, ids, None, dense_route="linear"), expected)
    torch.testing.assert_close(_logits(patched.model, ids, None, dense_route="kernel"), expected, rtol=1e-5, atol=1e-5)
    assert patched.dense_route in ("linear", "kernel")
    torch.testing.assert_close(expected, _logits(pristine, ids), rtol=1e-5, atol=1e-5)  # the layout: rounding only


def test_the_hf_layout_is_bit_identical_to_a_fresh_model_and_runs_no_kernel(family, monkeypatch):
    """layout="hf" keeps HF's storage and stays off the kernels: 0 % is exactly the pristine model, and every
    method runs on the reference ops (a kernel call would raise here)."""
    name, _, _, pristine = family
    plain = models.wrap(copy.deepcopy(pristine), tokenizer=None, name=f"tiny-{name}", layout="hf")
    ids = torch.randint(0, VOCAB, (2, 10))
    zero = SparsitySpec.from_tables("teal", plain.dense_spec().values, plain.fingerprint)
    assert torch.equal(_logits(plain.model, ids, zero), _logits(pristine, ids))

    def refuse(*args):
        raise AssertionError("a kernel ran in the hf layout")
    monkeypatch.setattr(ops, "sparse_linear", refuse)
    monkeypatch.setattr(ops, "rows_linear", refuse)
    specs = [plain.topk_spec(0.5)] + ([SparsitySpec.from_tables("cats", [[0.0, 0.0, 0.0, 0.05]] * plain.num_layers,
                                                               plain.fingerprint)] if name in GATED else [])
    for spec in specs:
        assert not torch.allclose(_logits(plain.model, ids, spec), _logits(pristine, ids), atol=1e-4)


def test_patching_restores_each_projection_in_place_in_the_kernels_layout(family):
    """The kernels' layout replaces HF's storage: every projection's storage is exactly its own size, and the
    parameters add up to what the unpatched model holds (that no copy appears later, when the kernels run, is
    test_scale's resident-memory probe)."""
    _, _, patched, pristine = family
    linears = [m for m in patched.model.modules() if isinstance(m, SparseLinear)]
    computed = {id(m.shared.linear if m.shared else m): (m.shared.linear if m.shared else m).inner for m in linears}
    projections = list(computed.values())  # what the kernels read: each projection, or its joint matrix (q|k|v, gate|up)
    assert projections and all(kernels.input_rows(p.weight if isinstance(p, nn.Linear) else p.weight.t())
                               for p in projections)
    assert all(p.weight.untyped_storage().nbytes() == p.weight.numel() * p.weight.element_size() for p in projections)
    for member in (m for m in linears if m.shared):  # a joint matrix is its members' one storage, not a copy
        assert member.weight.untyped_storage().data_ptr() == member.shared.linear.weight.untyped_storage().data_ptr()
    stored = lambda model: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())
    assert stored(patched.model) == stored(pristine)


def test_projections_that_share_an_input_run_as_one_sparse_call(family, monkeypatch):
    """q|k|v and gate|up (GPT-2's c_attn already is one): 4 sparse calls per decoder layer instead of 7."""
    name, _, patched, _ = family
    calls = []
    sparse_linear = ops.sparse_linear
    monkeypatch.setattr(ops, "sparse_linear", lambda x, w, *a: calls.append(tuple(w.shape)) or sparse_linear(x, w, *a))
    with torch.inference_mode(), sparsity(patched.topk_spec(0.5)):
        patched.model(torch.randint(0, VOCAB, (1, 1)))
        assert not patch._CALL.get().computed  # each joint output is dropped once its last member has read it
    assert len(calls) == 4 * patched.num_layers
    if name in GATED:
        config = patched.model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        assert calls[0] == ((heads + 2 * kv_heads) * head_dim, config.hidden_size)  # q|k|v
        assert (2 * config.intermediate_size, config.hidden_size) in calls  # gate|up


@pytest.mark.parametrize("method", ["teal", "topk", "cats"])
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_path_matches_masked_reference(family, method, batch):
    name, reference, patched, _ = family
    generator = torch.Generator().manual_seed(sorted(CONFIGS).index(name) * 100 + len(method) * 10 + batch)
    if method == "cats" and name not in GATED:
        with pytest.raises(ValueError, match="not gated"):
            patched.check(SparsitySpec.from_tables("cats", patched.dense_spec().values, patched.fingerprint))
        return
    spec = _random_spec(patched, method, generator)
    ids = torch.randint(0, VOCAB, (batch, 14), generator=generator)
    expected = _masked_reference_logits(reference, spec, ids)
    counter = SparsityCounter()
    got = _logits(patched.model, ids, spec, [counter])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the spec really skipped something, and differs from dense
    assert 0.05 < counter.weighted(patched.skippable_params(method)) < 0.95
    assert not torch.allclose(got, _logits(reference, ids), atol=1e-4)


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_cats_layout_matches_masked_reference(method):
    """The cats layout keeps up_proj's (out, in) rows for CATS' row kernel; TEAL then reads all of up."""
    pristine = _tiny("llama", seed=99)
    patched = models.wrap(copy.deepcopy(pristine), tokenizer=None, name="tiny-llama", layout="cats")
    reference = in_kernel_layout(pristine, layout="cats")
    assert patch.decoder_layers(patched.model)[0].mlp.up_proj.weight.is_contiguous()
    generator = torch.Generator().manual_seed(7)
    spec = _random_spec(patched, method, generator)
    ids = torch.randint(0, VOCAB, (1, 14), generator=generator)
    expected = _masked_reference_logits(reference, spec, ids)
    torch.testing.assert_close(_logits(patched.model, ids, spec), expected, rtol=1e-4, atol=1e-5)
    skippable = patched.skippable_params(method)[0]
    assert sum(skippable.values()) == sum(patched.group_params[0].values())
    assert skippable.get("read_anyway", 0) == (0 if method == "cats" else patched.group_params[0]["mlp_in"] // 2)


def test_bfloat16_kernel_dense_route_reads_through_the_kernel_and_matches_hf_within_rounding(monkeypatch):
    """bfloat16 on the CPU: the "kernel" dense route gathers every row through the kernel (a call on the CPU
    backend, not F.linear), and agrees with the pristine HF model within bfloat16 rounding."""
    pristine = _tiny("llama", seed=3).to(torch.bfloat16)
    patched = models.wrap(copy.deepcopy(pristine), tokenizer=None, name="tiny-llama-bf16")
    ids = torch.randint(0, VOCAB, (2, 12))
    calls = []
    real = ops.sparse_linear
    monkeypatch.setattr(ops, "sparse_linear", lambda *args: calls.append(ops.backend_for(*args[:2])) or real(*args))
    ours = _logits(patched.model, ids, None, dense_route="kernel")
    assert calls and set(calls) == {"CPU"}
    torch.testing.assert_close(ours.float(), _logits(pristine, ids).float(), rtol=0.02, atol=0.02)
    calls.clear()
    _logits(patched.model, ids, None, dense_route="linear")
    assert calls == []


def test_an_unknown_dense_route_is_one_sentence():
    with pytest.raises(ValueError, match="Unknown dense route 'fast'; choose one of kernel, linear."):
        with sparsity(None, dense_route="fast"):
            pass
