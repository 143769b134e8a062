"""The Triton kernels in interpret mode (TRITON_INTERPRET=1, set by conftest), on CPU tensors and small ragged
shapes, against a float64 masked reference. Interpret mode runs without a GPU, so these run everywhere."""
import pytest
import torch
import torch.nn.functional as F

from kernel_reference import check, input_rows_weight, reference
from sparse_core import ops
from sparse_core.kernels import triton_sparse_gemv as tg

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty the launchers make starts as NaN, so an output element a kernel skips shows up."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def inputs(tokens, width, out, dtype):
    x = torch.randn(tokens, width, dtype=dtype)
    weight = input_rows_weight(out, width, dtype)
    return x, weight, torch.randn(out, dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, 7])  # 7 > MAX_UNION_TOKENS: the masked dense path
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_sparse_gemv_matches_masked_reference(tokens, sparsity, dtype, poisoned_empty):
    x, weight, bias = inputs(tokens, 150, 90, dtype)  # ragged: neither is a multiple of the blocks
    threshold = {0.0: 0.0, 1.0: float("inf")}.get(sparsity) or float(x.abs().float().quantile(sparsity))
    y = tg.sparse_linear(x, weight, weight.t(), bias, None, threshold)
    assert y.dtype == dtype and y.shape == (tokens, 90)
    check(y, reference(x, weight, bias, threshold), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gemv_per_token_topk_threshold(dtype):
    x, weight, _ = inputs(3, 100, 40, dtype)
    threshold = ops.topk_threshold(x, ops.keep_count(0.7, x.shape[-1]))
    y = tg.sparse_linear(x.unsqueeze(0), weight, weight.t(), None, threshold.unsqueeze(0), 0.0)
    assert y.shape == (1, 3, 40)
    check(y[0], reference(x, weight, None, threshold), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_kernel_matches_reference(tokens, dtype, poisoned_empty):
    x, weight, bias = inputs(tokens, 100, 70, dtype)
    keep = torch.rand(tokens, 70) > 0.5
    y = tg.rows_linear(x, weight.contiguous(), bias, keep)  # CATS' up keeps HF's (out, in) rows
    check(y, F.linear(x.double(), weight.double(), bias.double()) * keep, dtype)
