"""int8 weights (quantize.py) and the op that reads their rows (sparse_lab::sparse_linear_int8): the quantization
against its definition, the native kernel on every vector path and the Triton kernel (in its interpreter, set by
conftest) against a float64 masked product over the dequantized weight, the op's contract and its fake
implementation."""
import pytest
import torch

from kernel_reference import reference
from sparse_core import kernels, ops, quantize
from sparse_core.kernels import cpu_native, triton_sparse_gemv_int8

SHAPES = [(1, 37, 53), (3, 150, 70), (1, 576, 1536), (1, 1536, 576), (8, 130, 577), (12, 96, 33)]  # (tokens, in, out)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_native.native(), cpu_native.native_failure()


def int8_weight(out, width, generator=None):
    """A random (out, in) weight whose rows' ranges differ along the input (as a model's do), quantized."""
    weight = torch.randn(out, width, generator=generator) * torch.rand(1, width, generator=generator) * 2 / width ** 0.5
    return (weight, *quantize.quantize(weight))


def test_quantize_is_blockwise_absmax_and_dequantize_inverts_it_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    weight, q, scales = int8_weight(70, 150, generator)
    assert q.dtype == torch.int8 and q.shape == (150, 70) and q.is_contiguous()
    assert scales.shape == (quantize.blocks(150), 70) == (3, 70) and scales.dtype == torch.float32
    for b in range(3):  # each block's scale: its largest |w| over 127, so that weight quantizes to +-127
        block = weight[:, b * quantize.BLOCK:(b + 1) * quantize.BLOCK].double()
        torch.testing.assert_close(scales[b].double(), block.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)
        assert (q[b * quantize.BLOCK:(b + 1) * quantize.BLOCK].abs().amax(dim=0) == 127).all()
    step = scales.double().repeat_interleave(quantize.BLOCK, dim=0)[:150].t()
    error = (quantize.dequantize(q, scales, torch.float64) - weight.double()).abs()
    assert (error <= step / 2 + 1e-7).all()


def test_a_block_of_zeros_quantizes_to_zeros():
    weight = torch.zeros(4, 64)
    q, scales = quantize.quantize(weight)
    assert not q.any() and not scales.any()
    assert not quantize.dequantize(q, scales).isnan().any()


@pytest.mark.parametrize("tokens, width, out", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_the_native_int8_gather_matches_the_float64_dequantized_reference(tokens, width, out, sparsity, vector_path):
    generator = torch.Generator().manual_seed(tokens * width + out)
    _, q, scales = int8_weight(out, width, generator)
    x, bias = torch.randn(tokens, width, generator=generator), torch.randn(out, generator=generator)
    threshold = float("inf") if sparsity == 1.0 else 0.0 if sparsity == 0.0 else float(x.abs().quantile(sparsity))
    with torch.inference_mode():
        y = ops.sparse_linear_int8(x, q, scales, bias, threshold)
    expected = reference(x, quantize.dequantize(q, scales, torch.float64), bias, threshold)
    assert y.dtype == torch.float32 and y.shape == (tokens, out)
    scale = expected.abs().max().item() + 1.0
    assert (y.double() - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("tokens", [1, 3, 7])  # 7 > the GPU's union tokens: the dequantized masked product
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("width, out", [(150, 90), (64, 33)])  # ragged, and one scale block
def test_the_triton_int8_gather_matches_the_float64_dequantized_reference(tokens, sparsity, width, out):
    generator = torch.Generator().manual_seed(tokens + width)
    _, q, scales = int8_weight(out, width, generator)
    x, bias = torch.randn(tokens, width, generator=generator), torch.randn(out, generator=generator)
    threshold = {0.0: 0.0, 1.0: float("inf")}.get(sparsity) or float(x.abs().quantile(sparsity))
    y = triton_sparse_gemv_int8.sparse_linear_int8(x, q, scales, bias, None, threshold)
    expected = reference(x, quantize.dequantize(q, scales, torch.float64), bias, threshold)
    assert y.dtype == torch.float32 and y.shape == (tokens, out) and not y.isnan().any()
    assert (y.double() - expected).abs().max().item() <= 1e-5 * (expected.abs().max().item() + 1.0)


def test_the_triton_int8_gather_takes_per_token_thresholds():
    generator = torch.Generator().manual_seed(4)
    _, q, scales = int8_weight(40, 100, generator)
    x = torch.randn(3, 100, generator=generator)
    threshold = ops.topk_threshold(x, ops.keep_count(0.6, 100))
    y = triton_sparse_gemv_int8.sparse_linear_int8(x, q, scales, None, threshold, 0.0)
    expected = reference(x, quantize.dequantize(q, scales, torch.float64), None, threshold)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_int8_op_reads_per_token_thresholds_like_the_reference():
    generator = torch.Generator().manual_seed(3)
    _, q, scales = int8_weight(90, 200, generator)
    x = torch.randn(3, 200, generator=generator)
    threshold = ops.topk_threshold(x, ops.keep_count(0.6, 200))
    y = ops.sparse_linear_int8(x, q, scales, None, threshold)
    expected = reference(x, quantize.dequantize(q, scales, torch.float64), None, threshold)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda q, s: (q.float(), s), "contiguous int8"),
    (lambda q, s: (q.t().contiguous().t(), s), "contiguous int8"),
    (lambda q, s: (q, s[:-1]), "float32 scales"),
    (lambda q, s: (q, s.half()), "float32 scales"),
])
@pytest.mark.parametrize("op", ["cpu-native", "triton-interpret", "reference", "fake"])
def test_the_int8_op_refuses_what_its_kernels_cannot_read(bad, match, op):
    _, q, scales = int8_weight(40, 130)
    q, scales = bad(q, scales)
    x = torch.randn(1, 130)
    if op == "fake":
        x, q, scales = (t.to("meta") for t in (x, q, scales))
    run = {"cpu-native": torch.ops.sparse_lab.sparse_linear_int8.default, "reference": ops._reference_int8_op,
           "triton-interpret": triton_sparse_gemv_int8.sparse_linear_int8,
           "fake": torch.ops.sparse_lab.sparse_linear_int8.default}[op]
    with pytest.raises((ValueError, RuntimeError), match=match):
        run(x, q, scales, None, None, 0.0)


def test_the_cpu_int8_kernel_takes_float32_activations_only_and_the_entry_routes_others():
    _, q, scales = int8_weight(40, 130)
    x = torch.randn(2, 130, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 activations"):
        torch.ops.sparse_lab.sparse_linear_int8(x, q, scales, None, None, 0.0)
    assert not kernels.takes_int8(x)
    y = ops.sparse_linear_int8(x, q, scales, None, 0.0)  # the reference, in x's dtype
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("threshold", ["scalar", "one", "per-token"])
def test_opcheck_passes_for_the_int8_op(threshold):
    generator = torch.Generator().manual_seed(9)
    _, q, scales = int8_weight(40, 130, generator)
    x, bias = torch.randn(3, 130, generator=generator), torch.randn(40, generator=generator)
    tensor = {"scalar": None, "one": torch.tensor(0.5), "per-token": torch.rand(3, 1, generator=generator)}[threshold]
    torch.library.opcheck(torch.ops.sparse_lab.sparse_linear_int8.default, (x, q, scales, bias, tensor, 0.5))
