"""Fast backends for `ops.sparse_linear`: one torch.library op, a native CPU kernel and a Triton GPU kernel.

Both kernels read the weight as (in, out) rows, so a skipped input is a skipped contiguous row. They take the
weight in that layout only: a patched model stores its projections that way (models.adopt_input_rows, in place,
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


@torch.library.register_fake("sparse_lab::sparse_linear")
def _sparse_linear_fake(x, weight, weight_t, bias, threshold, scalar_threshold):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("sparse_lab::rows_linear")
def _rows_linear_fake(x, weight, bias, keep):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


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
    native = triton_loaded() if x.is_cuda else (x.device.type == "cpu" and cpu_native.native())
    if not native or x.dtype != weight.dtype or not inference_only(x, weight) or not weight.is_contiguous():
        return None
    return torch.ops.sparse_lab.rows_linear(x, weight, bias, keep)
