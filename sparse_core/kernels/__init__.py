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
LIBRARY.define("rows_linear(Tensor x, Tensor weight, Tensor? bias, Tensor keep) -> Tensor")
LIBRARY.define("dot_linear(Tensor x, Tensor weight) -> Tensor")  # dense F.linear(x, weight) on (out, in) rows
LIBRARY.define("stream_read(Tensor data) -> Tensor")  # the sum of float32 data: the read-bandwidth probe
# One token through every decoder layer and the head (CPU, dense or TEAL): the logits (the dtype's values, held in
# float32) and the skipped inputs per (layer, group).
LIBRARY.define("decode_token(Tensor x, Tensor cos, Tensor sin, int position, Tensor[] qkv_t, Tensor[] o_t, "
               "Tensor[] gate_up_t, Tensor[] down_t, Tensor[] norms, Tensor(a!)[] caches, Tensor thresholds, "
               "Tensor final_norm, Tensor head, int heads, int kv_heads, float eps) -> (Tensor, Tensor)")


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
        threshold = threshold.to(x.dtype)
    if threshold.numel() == 1:
        return threshold.reshape(1).float().expand(tokens)
    if threshold.numel() != tokens:
        raise OpContractError(f"sparse_linear needs one threshold for all tokens or one per token; got "
                              f"{threshold.numel()} values for {tokens} tokens.")
    return threshold.reshape(tokens).float()


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
def _stream_read_fake(data):
    return data.new_empty(())


def input_rows(weight: torch.Tensor) -> bool:
    """True when `weight` (out, in) is a view of contiguous (in, out) rows: the layout the kernels read."""
    return weight.dim() == 2 and weight.t().is_contiguous()


_SPARSE_LINEAR = torch.ops.sparse_lab.sparse_linear.default  # the overload itself: skips ~4 us of resolution per call


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold) -> torch.Tensor:
    """The backend entry: `ops.sparse_linear`'s signature onto the op (a float threshold travels as a scalar)."""
    if isinstance(threshold, torch.Tensor):
        return _SPARSE_LINEAR(x, weight, weight.t(), bias, threshold, 0.0)
    return _SPARSE_LINEAR(x, weight, weight.t(), bias, None, float(threshold))


def inference_only(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The ops have no autograd formula: calls that need gradients stay on the reference path."""
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def kernel_ready(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """What every input-sparse kernel needs: x in the weight's dtype, one it supports, the input-rows layout,
    and no autograd."""
    return x.dtype == weight.dtype and x.dtype in dtypes and input_rows(weight) and inference_only(x, weight)


def triton_backend():
    """(name, accepts, fn, describe) for CUDA tensors; Triton is imported on the first CUDA call only."""
    def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return x.is_cuda and kernel_ready(x, weight, (torch.float16, torch.bfloat16, torch.float32)) and triton_loaded()

    def describe() -> str:
        if not torch.cuda.is_available():
            return "Triton input-sparse GEMV (no CUDA device here)"
        return "Triton input-sparse GEMV" if triton_loaded() else "reference (Triton is not installed)"
    return "GPU", accepts, sparse_linear, describe


@functools.cache
def triton_loaded() -> bool:
    """Import the Triton kernels, which registers them as the ops' CUDA implementation."""
    try:
        from . import triton_sparse_gemv  # noqa: F401
    except ImportError:
        return False
    return True


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    """The output-sparse op where a kernel for x's device is present, else None (the caller runs the reference)."""
    from . import cpu_native
    native = triton_loaded() if x.is_cuda else (x.device.type == "cpu" and x.dtype in cpu_native.DTYPES and cpu_native.native())
    if not native or x.dtype != weight.dtype or not inference_only(x, weight) or not weight.is_contiguous():
        return None
    return torch.ops.sparse_lab.rows_linear(x, weight, bias, keep)
