"""Fast backends for `ops.sparse_linear`: one torch.library op, a native CPU kernel and a Triton GPU kernel.

Both kernels read the weight as (in, out) rows, so a skipped input is a skipped contiguous row. HF keeps its own
(out, in) weight untouched: changing that storage makes float32 dense matmuls round differently from plain HF
(and bfloat16 ones slower), and 0 % sparsity must stay bit-identical to HF. So the (in, out) copy is made once,
on the first sparse call, cached on the weight and rebuilt if the weight changes (docs/PERFORMANCE.md).
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


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) as a contiguous (in, out) tensor: a free view when its storage already is (GPT-2 Conv1D),
    else a copy made once and cached on the tensor object until its data or version changes."""
    view = weight.t()  # callers run without autograd (see inference_only)
    if view.is_contiguous():
        return view
    key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)  # inference tensors have no version
    cached = getattr(weight, "_sparse_lab_t", None)
    if cached is None or cached[0] != key:
        cached = (key, view.contiguous())
        weight._sparse_lab_t = cached
    return cached[1]


_SPARSE_LINEAR = torch.ops.sparse_lab.sparse_linear.default  # the overload itself: skips ~4 us of resolution per call


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold) -> torch.Tensor:
    """The backend entry: `ops.sparse_linear`'s signature onto the op (a float threshold travels as a scalar)."""
    if isinstance(threshold, torch.Tensor):
        return _SPARSE_LINEAR(x, weight, transposed(weight), bias, threshold, 0.0)
    return _SPARSE_LINEAR(x, weight, transposed(weight), bias, None, float(threshold))


def inference_only(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The ops have no autograd formula: calls that need gradients stay on the reference path."""
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def triton_backend():
    """(name, accepts, fn, describe) for CUDA tensors; Triton is imported on the first CUDA call only."""
    def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and inference_only(x, weight) and triton_loaded())

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
    native = triton_loaded() if x.is_cuda else (x.device.type == "cpu" and cpu_native.native() is None)
    if not native or x.dtype != weight.dtype or not inference_only(x, weight) or not weight.is_contiguous():
        return None
    return torch.ops.sparse_lab.rows_linear(x, weight, bias, keep)
