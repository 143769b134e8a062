"""The native CPU kernel (and its embedding_bag fallback) against a float64 masked reference, on every vector path
this CPU has (scalar, AVX2, AVX-512, AVX-512 BF16): each kernel test runs once per path."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernel_reference import check, input_rows_weight, reference
from sparse_core import ops
from sparse_core.kernels import cpu_native

DTYPES = (torch.float32, torch.bfloat16)
SHAPES = [(1, 37, 53), (3, 150, 70), (1, 576, 1536), (12, 96, 33)]  # (tokens, in, out): ragged, batch 1/3, prefill

def inputs(tokens, width, out, dtype, bias=True):
    x = torch.randn(tokens, width, dtype=dtype)
    weight = input_rows_weight(out, width, dtype)
    return x, weight, torch.randn(out, dtype=dtype) if bias else None


def threshold_for(x, sparsity):
    """A scalar threshold skipping about `sparsity` of x (s=1 skips everything, s=0 nothing)."""
    if sparsity >= 1.0:
        return float("inf")
    return 0.0 if sparsity == 0.0 else float(x.abs().float().quantile(sparsity))


def poisoned_op(impl, shape, dtype):
    """Run the op after freeing NaN-filled blocks of its output's size, which malloc hands out again: an output
    element the kernel forgets to write then shows up as NaN (best effort: the allocator decides reuse)."""
    for _ in range(4):
        torch.full(shape, float("nan"), dtype=dtype)
    return impl()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens, width, out", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.03, 0.5, 0.9, 1.0])  # 0.03: nearly dense, still gathered
def test_native_sparse_linear_matches_masked_reference(tokens, width, out, dtype, sparsity, vector_path):
    assert cpu_native.native(), f"the native kernel should build on this machine ({cpu_native.native_failure()})"
    x, weight, bias = inputs(tokens, width, out, dtype)
    threshold = threshold_for(x, sparsity)
    with torch.inference_mode():
        y = poisoned_op(lambda: ops.sparse_linear(x, weight, bias, threshold), (tokens, out), dtype)
    assert ops.backend_for(x, weight) == "CPU" and y.dtype == dtype and y.shape == (tokens, out)
    check(y, reference(x, weight, bias, threshold), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_per_token_topk_threshold(tokens, dtype, vector_path):
    x, weight, bias = inputs(tokens, 200, 90, dtype, bias=False)
    threshold = ops.topk_threshold(x, ops.keep_count(0.6, x.shape[-1]))
    with torch.inference_mode():
        y = ops.sparse_linear(x.unsqueeze(0), weight, bias, threshold.unsqueeze(0))  # (batch, T, in) layout
    assert y.shape == (1, tokens, 90)
    check(y[0], reference(x, weight, bias, threshold), dtype)


def test_only_the_input_rows_layout_reaches_the_kernel_and_nothing_is_copied():
    """A weight in HF's (out, in) layout runs the reference path (a kernel would need a second, transposed copy);
    the (in, out) layout runs the kernel on the very storage it was given."""
    x = torch.randn(1, 30)
    hf_layout = torch.randn(40, 30)
    assert ops.backend_for(x, hf_layout) == "reference"
    rows = hf_layout.t().contiguous().t()
    assert ops.backend_for(x, rows) == "CPU"
    with torch.inference_mode():
        check(ops.sparse_linear(x, rows, None, 0.5), reference(x, hf_layout, None, 0.5), torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3])
def test_native_rows_linear_matches_reference(tokens, dtype, vector_path):
    x, weight, bias = inputs(tokens, 130, 77, dtype)
    keep = torch.rand(tokens, 77) > 0.6
    with torch.inference_mode():
        y = poisoned_op(lambda: ops.rows_linear(x, weight.contiguous(), bias, keep), (tokens, 77), dtype)
    check(y, F.linear(x.double(), weight.double(), bias.double()) * keep, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens, width, out", [(1, 576, 1031), (2, 130, 77), (1, 31, 5)])  # ragged: every tail
def test_dot_linear_matches_reference(tokens, width, out, dtype, vector_path):
    """The tied lm_head's GEMV reads HF's (out, in) rows, the embedding's own storage."""
    x = torch.randn(tokens, width, dtype=dtype)
    weight = torch.randn(out, width, dtype=dtype) / width ** 0.5
    with torch.inference_mode():
        y = poisoned_op(lambda: torch.ops.sparse_lab.dot_linear(x, weight), (tokens, out), dtype)
    assert y.dtype == dtype and y.shape == (tokens, out)
    check(y, F.linear(x.double(), weight.double()), dtype)


def test_stream_read_sums_what_it_reads(vector_path):
    data = torch.rand(1_000_003)  # not a multiple of any vector width or thread share
    for prefetch in (True, False):
        total = torch.ops.sparse_lab.stream_read(data, prefetch).item()
        assert total == pytest.approx(data.double().sum().item(), rel=1e-4)


def test_every_path_this_cpu_has_is_offered_and_none_wider():
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    widest = ("avx512_bf16" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= set(flags) else
              "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags) else
              "avx2" if {"avx2", "fma"} <= set(flags) else "scalar")
    assert cpu_native.supported_paths()[-1] == widest
    assert cpu_native.vector_path("avx512_bf16") == widest  # asking for more than the CPU has gives its widest


@pytest.mark.parametrize("asked", ["avx2", "scalar"])
def test_the_environment_variable_forces_a_narrower_path(asked):
    """SPARSE_LAB_ISA picks the path at load time, as on a laptop without AVX-512."""
    code = "from sparse_core.kernels import cpu_native; print(cpu_native.vector_path(), cpu_native.describe())"
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, SPARSE_LAB_ISA=asked), text=True,
                          capture_output=True, check=True)
    assert done.stdout.split()[0] == asked and f"{asked} vector path" in done.stdout


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens, sparsity", [(1, 0.5), (3, 0.9), (12, 0.5), (1, 1.0)])
def test_embedding_bag_fallback_matches_reference(tokens, sparsity, dtype):
    x, weight, bias = inputs(tokens, 150, 70, dtype)
    threshold = threshold_for(x, sparsity)
    y = cpu_native._embedding_bag_sparse_linear(x, weight, weight.t(), bias, None, threshold)
    check(y, reference(x, weight, bias, threshold), dtype)


def test_gradients_stay_on_the_reference_path():
    x = torch.randn(2, 16, requires_grad=True)
    weight = torch.randn(8, 16)
    assert ops.backend_for(x, weight) == "reference"
    ops.sparse_linear(x, weight, None, 0.3).sum().backward()
    assert x.grad is not None


def test_fake_tensor_shapes_compose_with_torch():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, weight = torch.randn(2, 5, 16), torch.randn(8, 16)
        y = torch.ops.sparse_lab.sparse_linear(x, weight, weight.t().contiguous(), None, None, 0.5)
    assert y.shape == (2, 5, 8)


def test_describe_backends_names_the_cpu_kernel():
    text = ops.describe_backends()
    assert "CPU: native C++/OpenMP" in text and "GPU: Triton" in text
