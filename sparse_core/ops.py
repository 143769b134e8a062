"""The one sparse operator every patched linear goes through.

    sparse_linear(x, weight, bias, threshold) == F.linear(x * (|x| > threshold), weight, bias)

`threshold` is a float (TEAL, CATS) or a per-token tensor shaped like x[..., :1] (top-k). The definition above
is the reference implementation and the test oracle; fast backends (native CPU, Triton) register behind the same
call and must agree with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Threshold = float | torch.Tensor


def above_threshold(score: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """True where an input survives. Strict '>' so a threshold of 0 keeps every non-zero input."""
    return score > threshold


def reference_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            threshold: Threshold) -> torch.Tensor:
    return F.linear(x * above_threshold(x.abs(), threshold), weight, bias)


def keep_count(drop_fraction, width):
    """How many inputs of a `width`-wide row top-k keeps: round((1 - drop) * width), half to even, in float64 (for
    one fraction, an int; for a tensor of them, a long tensor). The one count both decode roads use."""
    if isinstance(drop_fraction, torch.Tensor):
        return torch.round((1.0 - drop_fraction.double()) * width).long()
    return int(round((1.0 - drop_fraction) * width))


def topk_threshold(x: torch.Tensor, keep) -> torch.Tensor | float:
    """Per-token threshold that keeps the `keep` largest |x| of each row: the largest float below the keep-th
    largest |x|, so `|x| > t` keeps exactly those entries (ties at that value are kept together).

    `keep` an int (the patched model's): 0.0 when it keeps every input and inf when none, so the caller can take
    the dense or empty shortcut, else x.topk's value (a fifth faster than a sort on a 512-token prefill chunk).
    `keep` a long tensor (the compiled step's: topk needs k as a number, which would compile a graph per k): a sort
    and a gather, always a float32 tensor, with the same values and edges."""
    width = x.shape[-1]
    if not isinstance(keep, torch.Tensor):
        if keep >= width:
            return 0.0
        if keep <= 0:
            return float("inf")
        kth = x.abs().topk(keep, dim=-1).values[..., -1:]
        return torch.nextafter(kth, torch.zeros_like(kth))
    ranked = x.abs().sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (keep - 1).clamp(0, width - 1).expand(*x.shape[:-1], 1))
    below = torch.nextafter(kth, torch.zeros_like(kth)).float()
    return torch.where(keep >= width, 0.0, torch.where(keep <= 0, float("inf"), below))


def reference_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) * keep


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: Threshold) -> torch.Tensor:
    """The op where its contract holds (kernels.takes), dispatched by torch.library to the implementation for x's
    device; the reference otherwise (HF's (out, in) layout, a dtype no kernel computes, autograd)."""
    if kernels.takes(x, weight):
        return kernels.sparse_linear(x, weight, bias, threshold)
    return reference_sparse_linear(x, weight, bias, threshold)


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """Output-sparse linear for CATS' up projection: only rows (neurons) where `keep` is True are needed.

    Reference: the dense linear, then zero the unneeded outputs. The kernels read only the kept rows.
    """
    if kernels.takes_rows(x, weight):
        return kernels.rows_linear(x, weight, bias, keep)
    return reference_rows_linear(x, weight, bias, keep)


def reference_sparse_linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                                 threshold: Threshold) -> torch.Tensor:
    """The int8 op's definition: the reference over the weight the int8 rows stand for (quantize.dequantize)."""
    return reference_sparse_linear(x, quantize.dequantize(q, scales, x.dtype), bias, threshold)


def sparse_linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       threshold: Threshold) -> torch.Tensor:
    """sparse_linear over int8 rows and their block scales (quantize.py): the op where a kernel reads int8
    (kernels.takes_int8), the reference otherwise."""
    if kernels.takes_int8(x):
        return kernels.sparse_linear_int8(x, q, scales, bias, threshold)
    return reference_sparse_linear_int8(x, q, scales, bias, threshold)


def backend_for(x: torch.Tensor, weight: torch.Tensor) -> str:
    """What runs ops.sparse_linear(x, weight, ...): "CPU" or "CUDA" (the op's kernel for that dispatch key), or
    "reference"."""
    return kernels.implementation(x, weight)


def describe_backends() -> str:
    """Which implementation serves each device type's calls; 'reference' runs everything else."""
    return kernels.describe()


from . import kernels, quantize  # noqa: E402 - the kernels register behind the API above


def _reference_op(x, weight, weight_t, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear by the reference, under the same contract as the kernels (kernels.check_call)."""
    per_token = kernels.check_call(x, weight_t, threshold)
    limit = scalar_threshold if per_token is None else per_token.reshape(*x.shape[:-1], 1)
    return reference_sparse_linear(x, weight, bias, limit)


def _reference_int8_op(x, q, scales, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear_int8 by the reference, under the kernels' contract (kernels.check_int8_call)."""
    per_token = kernels.check_int8_call(x, q, scales, threshold)
    limit = scalar_threshold if per_token is None else per_token.reshape(*x.shape[:-1], 1)
    return reference_sparse_linear_int8(x, q, scales, bias, limit)


# The reference is the ops' implementation for every device without a kernel of its own (the dispatcher prefers a
# backend key's kernel, CPU or CUDA, over this one).
kernels.LIBRARY.impl("sparse_linear", _reference_op, "CompositeExplicitAutograd")
kernels.LIBRARY.impl("rows_linear", reference_rows_linear, "CompositeExplicitAutograd")
kernels.LIBRARY.impl("sparse_linear_int8", _reference_int8_op, "CompositeExplicitAutograd")
