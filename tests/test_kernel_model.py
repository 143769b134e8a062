"""SmolLM2 through the fast CPU backend agrees with the masked reference backend."""
import pytest
import torch

from sparse_core import calibrate, ops
from sparse_core.patch import sparsity
from sparse_core.spec import SparsitySpec


@pytest.fixture
def reference_only(monkeypatch):
    """Route every sparse call to the reference implementations, as if no fast backend were registered."""
    monkeypatch.setattr(ops, "_BACKENDS", [])
    monkeypatch.setattr(ops.kernels, "rows_linear", lambda *args: None)


def _logits(model, ids, spec):
    with torch.inference_mode(), sparsity(spec):
        prefill = model.model(ids[:, :-1], use_cache=True)
        step = model.model(ids[:, -1:], cache=prefill.cache, use_cache=True)
    return prefill.logits, step.logits


def _spec(model, method):
    """TEAL 50 % as calibrated; CATS with a fixed gate threshold (its calibration pass would double the runtime)."""
    if method == "teal":
        return calibrate.calibrate(model, "teal", 0.5)
    return SparsitySpec.from_tables("cats", [[0.0, 0.0, 0.0, 0.05]] * model.num_layers, model.fingerprint)


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_fast_cpu_backend_matches_reference_backend(smollm2, request, method):
    spec = _spec(smollm2, method)
    ids = smollm2.tokenizer("The lighthouse keeper found a bottle on the beach", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert ops.backend_for(torch.zeros(1, 576), smollm2.model.model.layers[0].mlp.down_proj.weight) == "CPU"
    fast = _logits(smollm2, ids, spec)
    request.getfixturevalue("reference_only")
    expected = _logits(smollm2, ids, spec)
    for got, want in zip(fast, expected):  # prefill (T > 1) and one decode step (T = 1)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
