"""SmolLM2 through the fast CPU backend agrees with the masked reference backend.

TEAL's mask is discontinuous: an input within float32 rounding of its threshold can land on either side, and one
such flip changes every later layer and position. So the logits are compared at the positions before the first
flip, the first flip must be rounding-rare (a few inputs, not a wrong kernel), and every sparse call is also
checked on its own input, where no flip can happen.
"""
import pytest
import torch

from sparse_core import calibrate, ops
from sparse_core.patch import sparsity
from sparse_core.spec import SparsitySpec

PROMPT = "The lighthouse keeper found a bottle on the beach"


class Masks:
    """Records each observed keep mask, per (layer, group) in call order."""

    def __init__(self):
        self.masks = []

    def observe(self, layer, group, score, threshold):
        self.masks.append(score > threshold)


@pytest.fixture
def reference_only(monkeypatch):
    """Route every sparse call to the reference implementations, as if no kernel took them."""
    monkeypatch.setattr(ops.kernels, "takes", lambda x, weight: False)
    monkeypatch.setattr(ops.kernels, "takes_rows", lambda x, weight: False)


def _spec(model, method):
    """TEAL 50 % as calibrated; CATS with a fixed gate threshold (its calibration pass would double the runtime)."""
    if method == "teal":
        return calibrate.calibrate(model, "teal", 0.5)
    return SparsitySpec.from_tables("cats", [[0.0, 0.0, 0.0, 0.05]] * model.num_layers, model.fingerprint)


def _run(model, ids, spec):
    """Logits and keep masks of a prefill and one cached decode step."""
    masks = Masks()
    with torch.inference_mode(), sparsity(spec, [masks]):
        prefill = model.model(ids[:, :-1], use_cache=True)
        step = model.model(ids[:, -1:], cache=prefill.cache, use_cache=True)
    return torch.cat([prefill.logits, step.logits], dim=1), masks.masks


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_fast_cpu_backend_matches_reference_backend(smollm2, request, method):
    spec = _spec(smollm2, method)
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert ops.backend_for(torch.zeros(1, 576), smollm2.model.model.layers[0].mlp.down_proj.weight) == "CPU"
    fast, fast_masks = _run(smollm2, ids, spec)
    request.getfixturevalue("reference_only")
    expected, expected_masks = _run(smollm2, ids, spec)
    tokens = ids.shape[1]
    flipped = torch.zeros(tokens, dtype=torch.bool)
    for got, want in zip(fast_masks, expected_masks):
        differs = (got != want).reshape(-1, got.shape[-1]).any(-1)
        start = 0 if len(differs) == tokens - 1 else tokens - 1  # prefill rows, or the decode step's one
        flipped[start:start + len(differs)] |= differs
    first = next((int((a != b).sum()) for a, b in zip(fast_masks, expected_masks) if not torch.equal(a, b)), 0)
    assert first <= 3, f"the first differing mask has {first} flips: more than float32 rounding explains"
    clean = int(flipped.nonzero()[0]) if flipped.any() else tokens
    assert clean >= 2
    torch.testing.assert_close(fast[:, :clean], expected[:, :clean], atol=2e-3, rtol=1e-3)


def test_every_sparse_call_of_the_model_matches_the_reference(smollm2, monkeypatch):
    """The model's own shapes and thresholds, each call checked on its own input (prefill and decode)."""
    spec = _spec(smollm2, "teal")
    fast, checked = ops.sparse_linear, []

    def compare(x, weight, bias, threshold):
        y = fast(x, weight, bias, threshold)
        want = ops.reference_sparse_linear(x.double(), weight.double(), None if bias is None else bias.double(), threshold)
        torch.testing.assert_close(y.double(), want, atol=1e-6 * float(want.abs().max()) + 1e-4, rtol=1e-4)
        checked.append(x.shape[-2])
        return y

    monkeypatch.setattr(ops, "sparse_linear", compare)
    _run(smollm2, smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"], spec)
    assert len(checked) == 2 * 4 * smollm2.num_layers and 1 in checked and max(checked) > 1  # q|k|v, o, gate|up, down
