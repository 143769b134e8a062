"""Property-based fuzzing of the sparse operator: random shapes, dtypes, sparsities, batch sizes and threshold
kinds, on every backend this machine has (native CPU, the Triton kernel in interpret mode, the dispatching op),
against the float64 masked reference."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from kernel_reference import check, input_rows_weight, reference
from sparse_core import kernels, ops
from sparse_core.kernels import triton_sparse_gemv

BACKENDS = {
    "dispatch": lambda x, w, b, t: ops.sparse_linear(x, w, b, t),
    "cpu-native": kernels.sparse_linear,  # the op on CPU tensors: the C++ kernel (built on first use)
    "triton-interpret": lambda x, w, b, t: triton_sparse_gemv.sparse_linear(
        x, w, w.t(), b, t if torch.is_tensor(t) else None, 0.0 if torch.is_tensor(t) else t),
}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    tokens = draw(st.sampled_from([1, 2, 3, 9]))  # 9 > the union-gather limit: the masked dense path
    width, out = draw(st.integers(1, 96)), draw(st.integers(1, 80))
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
    per_token = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dtype, tokens, width, out, sparsity, per_token, draw(st.booleans()), seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), backend=st.sampled_from(sorted(BACKENDS)))
def test_every_backend_matches_the_masked_reference(case, backend):
    dtype, tokens, width, out, sparsity, per_token, with_bias, seed = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator).to(dtype)
    weight = input_rows_weight(out, width, dtype, generator)
    bias = torch.randn(out, generator=generator).to(dtype) if with_bias else None
    if per_token:
        threshold = ops.topk_threshold(x, ops.keep_count(sparsity, width))
        threshold = threshold if torch.is_tensor(threshold) else torch.full((tokens, 1), threshold, dtype=dtype)
    else:
        threshold = float(x.abs().float().quantile(sparsity)) if 0 < sparsity < 1 else (0.0 if sparsity == 0 else float("inf"))
    y = BACKENDS[backend](x, weight, bias, threshold)
    assert y.shape == (tokens, out) and y.dtype == dtype
    check(y, reference(x, weight, bias, threshold), dtype)
