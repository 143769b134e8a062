"""The op's own contract, on every implementation: a threshold of one value broadcasts over the tokens (0-dim, (1,)
and (1, 1) alike), a threshold of any other wrong size is refused, and a weight_t that is not a contiguous (in, out)
matrix is refused (ops.sparse_linear routes such weights to the reference instead). torch.library.opcheck checks
the registrations themselves: schema, fake (Meta) implementation, dispatch under tracing."""
import pytest
import torch

from kernel_reference import check, input_rows_weight, reference
from sparse_core import kernels, ops
from sparse_core.kernels import check_call, cpu_native, triton_sparse_gemv

BACKENDS = {
    "cpu-native": torch.ops.sparse_lab.sparse_linear,  # the registered op on CPU tensors
    "triton-interpret": triton_sparse_gemv.sparse_linear,
    "embedding-bag-fallback": cpu_native._embedding_bag_sparse_linear,
    "reference-default": ops._reference_op,  # what the dispatcher runs for a device with no kernel of its own
}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_native.native(), cpu_native.native_failure()  # the op's CPU implementation is the C++ kernel


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("tokens", [2, 3])
def test_one_threshold_value_broadcasts_over_the_tokens(backend, dtype, shape, tokens):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 48, generator=generator).to(dtype)
    weight, bias = input_rows_weight(40, 48, dtype, generator), torch.randn(40, generator=generator).to(dtype)
    threshold = torch.full(shape, 0.61)  # float32, as a calibration table holds it; x may be bfloat16
    y = BACKENDS[backend](x, weight, weight.t(), bias, threshold, 0.0)
    check(y, reference(x, weight, bias, threshold), dtype)
    assert (y[1:] != 0).any()  # the tokens after the first were computed, not read past the threshold


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_threshold_of_another_size_is_refused(backend):
    x, weight = torch.randn(3, 32), input_rows_weight(16, 32, torch.float32)
    with pytest.raises(ValueError, match="one threshold for all tokens or one per token"):
        BACKENDS[backend](x, weight, weight.t(), None, torch.full((2, 1), 0.5), 0.0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_weight_t_that_is_not_contiguous_rows_is_refused(backend):
    x = torch.randn(2, 32)
    weight = torch.randn(16, 32)  # HF's (out, in) storage: its .t() is a strided view
    with pytest.raises(ValueError, match="contiguous \\(in, out\\) matrix"):
        BACKENDS[backend](x, weight, weight.t(), None, None, 0.5)


def test_the_fake_implementation_checks_the_same_contract():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, weight = torch.randn(3, 32), torch.randn(16, 32)
        with pytest.raises(ValueError, match="contiguous"):
            torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), None, None, 0.5)
        wt = weight.t().contiguous()
        with pytest.raises(ValueError, match="one per token"):
            torch.ops.sparse_lab.sparse_linear(x, wt.t(), wt, None, torch.ones(2), 0.0)


def test_the_python_entry_routes_other_layouts_to_the_reference():
    x, weight = torch.randn(2, 32), torch.randn(16, 32)
    assert ops.backend_for(x, weight) == "reference"
    check(ops.sparse_linear(x, weight, None, torch.tensor(0.4)), reference(x, weight, None, torch.tensor(0.4)), torch.float32)


def test_check_call_returns_one_float32_value_per_token():
    x, wt = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    assert check_call(x, wt, None) is None
    assert check_call(x, wt, torch.tensor(0.3)).tolist() == [torch.tensor(0.3, dtype=torch.bfloat16).item()] * 6
    assert check_call(x, wt, torch.arange(6.0).reshape(2, 3, 1)).tolist() == list(range(6))


def test_the_cpu_kernel_refuses_a_dtype_it_does_not_compute():
    x, weight = torch.randn(2, 32, dtype=torch.float16), input_rows_weight(16, 32, torch.float16)
    with pytest.raises(ValueError, match="on the CPU takes float32 or bfloat16, not Half"):
        torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), None, None, 0.5)
    assert ops.backend_for(x, weight) == "reference"  # the Python entry never sends it there


def test_the_cpu_row_kernel_refuses_a_dtype_it_does_not_compute_and_the_entry_routes_it():
    x, weight = torch.randn(2, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16)
    keep = torch.rand(2, 16) > 0.5
    with pytest.raises(ValueError, match="on the CPU takes float32 or bfloat16"):
        torch.ops.sparse_lab.rows_linear(x, weight, None, keep)
    expected = torch.nn.functional.linear(x.double(), weight.double()) * keep
    torch.testing.assert_close(ops.rows_linear(x, weight, None, keep).double(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", ["scalar", "one", "per-token"])
def test_opcheck_passes_for_the_input_sparse_op(dtype, threshold):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 48, generator=generator).to(dtype)
    weight, bias = input_rows_weight(40, 48, dtype, generator), torch.randn(40, generator=generator).to(dtype)
    tensor = {"scalar": None, "one": torch.tensor(0.5), "per-token": torch.rand(3, 1, generator=generator)}[threshold]
    torch.library.opcheck(torch.ops.sparse_lab.sparse_linear.default, (x, weight, weight.t(), bias, tensor, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_passes_for_the_row_op(dtype):
    generator = torch.Generator().manual_seed(8)
    x, weight = torch.randn(2, 32, generator=generator).to(dtype), torch.randn(24, 32, generator=generator).to(dtype)
    keep = torch.rand(2, 24, generator=generator) > 0.5
    torch.library.opcheck(torch.ops.sparse_lab.rows_linear.default, (x, weight, None, keep))


def test_the_dispatcher_runs_the_kernel_registered_for_the_device_and_the_reference_elsewhere():
    x, weight = torch.randn(1, 32), input_rows_weight(16, 32, torch.float32)
    assert ops.backend_for(x, weight) == "CPU"  # the CPU dispatch key has the C++ kernel
    on_meta = ops.sparse_linear(x.to("meta"), weight.to("meta"), None, 0.5)  # no kernel and no kernel dtype: reference
    assert on_meta.device.type == "meta" and on_meta.shape == (1, 16)
    assert ops.backend_for(x.to("meta"), weight.to("meta")) == "reference"


def test_the_cpu_kernel_rounds_a_scalar_threshold_by_the_one_rule():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(1, 256, generator=generator).to(torch.bfloat16)
    weight = input_rows_weight(32, 256, torch.bfloat16, generator)
    for value in torch.rand(50, generator=generator).tolist():  # most are not bfloat16 values
        rounded = kernels.comparable(value, torch.bfloat16)
        as_given = torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), None, None, value)
        assert torch.equal(as_given, torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), None, None, rounded))
        assert torch.equal(as_given, torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), None,
                                                                        torch.tensor(value), 0.0))


def test_top_k_gives_the_same_threshold_for_a_count_and_for_a_count_tensor():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 40, generator=torch.Generator().manual_seed(10)).to(dtype)
        for keep in (0, 1, 17, 39, 40):
            as_int, as_tensor = ops.topk_threshold(x, keep), ops.topk_threshold(x, torch.tensor(keep))
            assert torch.equal(torch.as_tensor(as_int, dtype=torch.float32).expand(3, 1), as_tensor)
            survivors = (x.abs() > as_tensor).sum(-1)
            assert (survivors == keep).all() if dtype == torch.float32 else (survivors >= keep).all()  # bf16: ties
