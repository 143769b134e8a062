"""Fast backends for `ops.sparse_linear`: one torch.library op, a native CPU kernel and a Triton GPU kernel.

Both kernels read the weight as (in, out) rows, so a skipped input is a skipped contiguous row. They take the
weight in that layout only: a patched model stores its projections that way (patch.adopt_input_rows, in place,
one copy), and a weight in HF's (out, in) layout runs the reference path rather than being copied behind the
caller's back (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import functools

import torch

LIBRARY = torch.library.Library("sparse_lab", "DEF")
LIBRARY.define("sparse_linear(Tensor x, Tensor weight, Tensor weight_t, Tensor? bias, Tensor? threshold, "
               "float scalar_threshold) -> Tensor")
# The same over int8 weights (quantize.py): q the (in, out) int8 rows, scales one float32 row per quantize.BLOCK inputs.
LIBRARY.define("sparse_linear_int8(Tensor x, Tensor q, Tensor scales, Tensor? bias, Tensor? threshold, "
               "float scalar_threshold) -> Tensor")
LIBRARY.define("rows_linear(Tensor x, Tensor weight, Tensor? bias, Tensor keep) -> Tensor")
LIBRARY.define("dot_linear(Tensor x, Tensor weight) -> Tensor")  # dense F.linear(x, weight) on (out, in) rows
LIBRARY.define("stream_read(Tensor data, bool prefetch=True) -> Tensor")  # the sum of float32 data: the bandwidth probe
# One token through every decoder layer and the head (CPU): the logits (the dtype's values, held in float32) and the
# skipped inputs per (layer, group). Dense or TEAL by `thresholds` [layers, 4]; top-k by `keep` [layers, 4] (the
# inputs each group keeps a token); CATS by `gate` [layers] (the threshold on |act(gate)|). With `phases`, thread 0's
# seconds per phase of the token are added to it (csrc/vector_kernels.h's Phase, bench profile). `scales` is empty
# for float weights; int8 weights (quantize.py) pass each layer's four projections' scales, then the head's, whose
# rows are then (hidden, vocab).
LIBRARY.define("decode_token(Tensor x, Tensor cos, Tensor sin, int position, Tensor[] qkv_t, Tensor[] o_t, "
               "Tensor[] gate_up_t, Tensor[] down_t, Tensor[] norms, Tensor(a!)[] caches, Tensor thresholds, "
               "Tensor? keep, Tensor? gate, Tensor final_norm, Tensor head, int heads, int kv_heads, float eps, Tensor[] scales, "
               "Tensor(b!)? phases=None) -> (Tensor, Tensor)")


# The token counts where the kernels change strategy, per device type, measured (docs/PERFORMANCE.md): up to
# UNION_TOKENS tokens a call gathers the union of the tokens' active rows, beyond it a masked dense matmul (the C++
# kernel is built with the CPU's number); a dense product goes through the kernel with nothing skipped up to
# DENSE_GATHER_TOKENS tokens (a decode step is one), where plain F.linear beats the masked matmul beyond it.
UNION_TOKENS = {"cpu": 8, "cuda": 4}
DENSE_GATHER_TOKENS = 4


def comparable(threshold, dtype: torch.dtype):
    """The one rounding rule of a threshold: torch compares x with a Python float or a 0-dim tensor in x's dtype,
    so such a threshold is worth its value in that dtype (kept as float32, or a Python float for a float). Every
    road to the op rounds with this (the C++ kernel mirrors it for the scalar it is given)."""
    if isinstance(threshold, torch.Tensor):
        return threshold.to(dtype).float()
    return _comparable_float(float(threshold), dtype)


@functools.lru_cache(maxsize=4096)
def _comparable_float(value: float, dtype: torch.dtype) -> float:
    return value if dtype == torch.float32 else torch.tensor(value, dtype=dtype).item()


class OpContractError(ValueError):
    """A call to the op that its kernels cannot run correctly; the message is one sentence."""


def check_call(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor | None:
    """The op's contract, enforced by every backend (the C++ kernel mirrors it): `weight_t` is a contiguous
    (in, out) matrix, since the kernels stream its rows by pointer arithmetic (ops.sparse_linear routes any other
    layout to the reference before it gets here); `threshold` is None (the scalar), one value for every token, or
    one per token. Returns the threshold as one float32 value per token, or None for the scalar."""
    if weight_t.dim() != 2 or not weight_t.is_contiguous() or x.shape[-1] != weight_t.shape[0]:
        raise OpContractError(f"sparse_linear needs weight_t as a contiguous (in, out) matrix with in = {x.shape[-1]}, "
                              f"got shape {tuple(weight_t.shape)}, strides {weight_t.stride()}; call ops.sparse_linear, "
                              "which routes other layouts to the reference.")
    if threshold is None:
        return None
    tokens = x.numel() // max(x.shape[-1], 1)
    if threshold.dim() == 0:  # torch compares x with a 0-dim tensor in x's dtype, as with a Python float
        threshold = comparable(threshold, x.dtype)
    if threshold.numel() == 1:
        return threshold.reshape(1).float().expand(tokens)
    if threshold.numel() != tokens:
        raise OpContractError(f"sparse_linear needs one threshold for all tokens or one per token; got "
                              f"{threshold.numel()} values for {tokens} tokens.")
    return threshold.reshape(tokens).float()


def check_int8_call(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, threshold: torch.Tensor | None):
    """sparse_linear_int8's contract (the C++ kernel mirrors it): q contiguous int8 (in, out) rows, scales one
    float32 row per quantize.BLOCK inputs and a column per output; thresholds as check_call takes them."""
    from ..quantize import blocks
    inputs = x.shape[-1]
    if q.dim() != 2 or q.dtype != torch.int8 or not q.is_contiguous() or q.shape[0] != inputs:
        raise OpContractError(f"sparse_linear_int8 needs q as contiguous int8 (in, out) rows with in = {inputs}, got "
                              f"{q.dtype} of shape {tuple(q.shape)}.")
    if scales.dtype != torch.float32 or not scales.is_contiguous() or tuple(scales.shape) != (blocks(inputs), q.shape[1]):
        raise OpContractError(f"sparse_linear_int8 needs float32 scales of shape {(blocks(inputs), q.shape[1])}, got "
                              f"{scales.dtype} of shape {tuple(scales.shape)}.")
    return check_call(x, q, threshold)


@torch.library.register_fake("sparse_lab::sparse_linear_int8")
def _sparse_linear_int8_fake(x, q, scales, bias, threshold, scalar_threshold):
    check_int8_call(x, q, scales, threshold)
    return x.new_empty(*x.shape[:-1], q.shape[1])


@torch.library.register_fake("sparse_lab::sparse_linear")
def _sparse_linear_fake(x, weight, weight_t, bias, threshold, scalar_threshold):
    check_call(x, weight_t, threshold)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("sparse_lab::rows_linear")
def _rows_linear_fake(x, weight, bias, keep):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("sparse_lab::dot_linear")
def _dot_linear_fake(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("sparse_lab::stream_read")
def _stream_read_fake(data, prefetch=True):
    return data.new_empty(())


def input_rows(weight: torch.Tensor) -> bool:
    """True when `weight` (out, in) is a view of contiguous (in, out) rows: the layout the kernels read."""
    return weight.dim() == 2 and weight.t().is_contiguous()


# What the registered kernels compute, by device type; a call outside it (another dtype or device) runs the reference.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16, torch.float32)}


INT8_DEVICES = ("cpu", "cuda")  # where a kernel reads int8 rows (C++, Triton); elsewhere the int8 op runs its reference


def inference_only(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The ops have no autograd formula: calls that need gradients stay on the reference path."""
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The input-sparse op's contract: what the kernels of x's device compute, on the input-rows layout. Which
    implementation then runs is the dispatcher's choice."""
    return _computes(x, weight) and input_rows(weight)


def takes_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The output-sparse (CATS row) op's contract: what the kernels of x's device compute, on (out, in) rows."""
    return _computes(x, weight) and weight.is_contiguous()


def takes_int8(x: torch.Tensor) -> bool:
    """The int8 op's contract on the activations: float32, on a device whose kernels read int8 rows."""
    return x.dtype == torch.float32 and x.device.type in INT8_DEVICES and inference_only(x, x)


def _computes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and x.dtype in KERNEL_DTYPES.get(x.device.type, ()) and inference_only(x, weight)


@functools.cache
def _implementations() -> None:
    """Register the ops' implementations, once per process, before the first call dispatches: the CPU kernel (built
    on first use, or its pure-torch fallback) and, where torch sees a GPU, the Triton kernels. The reference is
    registered for every other device (ops.py), so the dispatcher always finds one."""
    from . import cpu_native
    cpu_native.native()
    if torch.cuda.is_available():
        triton_loaded()


_SPARSE_LINEAR = torch.ops.sparse_lab.sparse_linear.default  # the overload itself: skips ~4 us of resolution per call


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold) -> torch.Tensor:
    """`ops.sparse_linear`'s signature onto the op (a float threshold travels as a scalar); the dispatch key of x
    picks the implementation."""
    _implementations()
    if isinstance(threshold, torch.Tensor):
        return _SPARSE_LINEAR(x, weight, weight.t(), bias, threshold, 0.0)
    return _SPARSE_LINEAR(x, weight, weight.t(), bias, None, float(threshold))


_SPARSE_LINEAR_INT8 = torch.ops.sparse_lab.sparse_linear_int8.default


def sparse_linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       threshold) -> torch.Tensor:
    """`ops.sparse_linear_int8`'s signature onto the op, as sparse_linear's."""
    _implementations()
    if isinstance(threshold, torch.Tensor):
        return _SPARSE_LINEAR_INT8(x, q, scales, bias, threshold, 0.0)
    return _SPARSE_LINEAR_INT8(x, q, scales, bias, None, float(threshold))


def implementation(x: torch.Tensor, weight: torch.Tensor) -> str:
    """What runs this call: "CPU" or "CUDA" (a kernel registered for x's dispatch key), or "reference"."""
    if not takes(x, weight):
        return "reference"
    _implementations()
    key = "CUDA" if x.is_cuda else "CPU"
    return key if torch._C._dispatch_has_kernel_for_dispatch_key("sparse_lab::sparse_linear", key) else "reference"


def describe() -> str:
    """Which implementation serves each device type, and what runs otherwise."""
    from . import cpu_native
    if not torch.cuda.is_available():
        gpu = "Triton input-sparse GEMV (no CUDA device here)"
    else:
        gpu = "Triton input-sparse GEMV" if triton_loaded() else "reference (Triton is not installed)"
    return f"CPU: {cpu_native.describe()}; GPU: {gpu}; otherwise: reference (masked F.linear)"


@functools.cache
def triton_loaded() -> bool:
    """Import the Triton kernels, which registers them as the ops' CUDA implementation."""
    try:
        from . import triton_sparse_gemv, triton_sparse_gemv_int8  # noqa: F401
    except ImportError:
        return False
    return True


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The output-sparse op; the dispatch key of x picks the implementation."""
    _implementations()
    return torch.ops.sparse_lab.rows_linear(x, weight, bias, keep)
