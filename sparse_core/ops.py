"""The one sparse operator every patched linear goes through.

    sparse_linear(x, weight, bias, threshold) == F.linear(x * (|x| > threshold), weight, bias)

`threshold` is a float (TEAL, CATS) or a per-token tensor shaped like x[..., :1] (top-k). The definition above
is the reference implementation and the test oracle; fast backends (native CPU, Triton) register behind the same
call and must agree with it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Threshold = float | torch.Tensor
# Up to this many tokens (a decode step is one) a dense product may go through the kernel with nothing skipped; the
# kernels run a masked dense matmul beyond it, which plain F.linear beats when nothing is masked (prefill).
DENSE_GATHER_TOKENS = 4


def keep_mask(score: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """True where an input survives. Strict '>' so a threshold of 0 keeps every non-zero input."""
    return score > threshold


def reference_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            threshold: Threshold) -> torch.Tensor:
    return F.linear(x * keep_mask(x.abs(), threshold), weight, bias)


def topk_threshold(x: torch.Tensor, drop_fraction: float) -> torch.Tensor | float:
    """Per-token threshold that keeps the k = round((1 - drop) * width) largest |x| of each row.

    Returned as the largest float below the k-th largest |x|, so `|x| > t` keeps exactly those entries
    (ties at the k-th value are kept together).
    """
    width = x.shape[-1]
    keep = int(round((1.0 - drop_fraction) * width))
    if keep >= width:
        return 0.0
    if keep <= 0:
        return float("inf")
    kth = x.abs().topk(keep, dim=-1).values[..., -1:]
    return torch.nextafter(kth, torch.zeros_like(kth))


# ---- backends ---------------------------------------------------------------------------------------
# A backend is (name, accepts(x, weight) -> bool, fn, describe() -> str). The most recently registered backend
# that accepts a call runs it; the reference runs whatever none accepts.
Backend = tuple[str, Callable[[torch.Tensor, torch.Tensor], bool], Callable[..., torch.Tensor], Callable[[], str]]
_BACKENDS: list[Backend] = []


def register_backend(name: str, accepts: Callable[[torch.Tensor, torch.Tensor], bool], fn: Callable[..., torch.Tensor],
                     describe: Callable[[], str] | None = None) -> None:
    _BACKENDS.insert(0, (name, accepts, fn, describe or (lambda: name)))


def backend_for(x: torch.Tensor, weight: torch.Tensor) -> str:
    for name, accepts, _, _ in _BACKENDS:
        if accepts(x, weight):
            return name
    return "reference"


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: Threshold) -> torch.Tensor:
    for _, accepts, fn, _ in _BACKENDS:
        if accepts(x, weight):
            return fn(x, weight, bias, threshold)
    return reference_sparse_linear(x, weight, bias, threshold)


def reference_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) * keep


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """Output-sparse linear for CATS' up projection: only rows (neurons) where `keep` is True are needed.

    Reference: the dense linear, then zero the unneeded outputs. The kernels read only the kept rows.
    """
    y = kernels.rows_linear(x, weight, bias, keep)
    return reference_rows_linear(x, weight, bias, keep) if y is None else y


def describe_backends() -> str:
    """Which backend runs each device's calls, most preferred first; 'reference' runs everything else."""
    return "; ".join([f"{name}: {describe()}" for name, _, _, describe in _BACKENDS] + ["otherwise: reference (masked F.linear)"])


from . import kernels  # noqa: E402 - the kernels register behind the API above
from .kernels import cpu_native  # noqa: E402

register_backend(*kernels.triton_backend())
register_backend(*cpu_native.backend())
