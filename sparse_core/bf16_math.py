"""bfloat16 matrix products in float32 arithmetic, on a CPU whose own bfloat16 GEMM is slow.

torch multiplies bfloat16 matrices on the CPU through oneDNN where the CPU has AVX-512 (with its bfloat16 dot
products where present); elsewhere (AVX2 only, as on most laptops) it falls back to a plain loop, measured 60 times
slower than float32 on one projection (docs/PERFORMANCE.md). There, a bfloat16 model's multi-token work (a prompt's
prefill, calibration, the quality measurement, greedy allocation's block replays) computes each product in float32
from the bfloat16 values and rounds the result to bfloat16, as a bfloat16 GEMM that accumulates in float32 rounds
its output: the same values up to the order of the sums. One-token decode steps go through the native kernels,
which read bfloat16 on every vector path.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .kernels import UNION_TOKENS

_PRODUCTS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
             torch.Tensor.__matmul__, F.scaled_dot_product_attention}


def _widened(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


class Float32Products(TorchFunctionMode):
    """Inside it, every bfloat16 matrix product (F.linear, matmul, attention, the sparse op beyond the kernels'
    gather) runs in float32 and comes back as bfloat16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*map(_widened, args), **{k: _widened(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        if func is _SPARSE_LINEAR and _masked_matmul(args[0]):
            x, weight, weight_t, bias, *rest = args
            rows = weight_t.float()  # (in, out), contiguous as the op requires; weight is its (out, in) view
            return func(x.float(), rows.t(), rows, _widened(bias), *rest, **kwargs).to(torch.bfloat16)
        if func is _ROWS_LINEAR and _masked_matmul(args[0]):
            return func(*map(_widened, args), **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


_SPARSE_LINEAR, _ROWS_LINEAR = torch.ops.sparse_lab.sparse_linear.default, torch.ops.sparse_lab.rows_linear.default


def _masked_matmul(x: torch.Tensor) -> bool:
    """A bfloat16 call the sparse op answers with a masked dense matmul (more tokens than its gather takes)."""
    return x.dtype == torch.bfloat16 and x.numel() > UNION_TOKENS["cpu"] * x.shape[-1]


@functools.cache
def _slow_bf16_gemm() -> bool:
    """True where torch's CPU bfloat16 GEMM is its slow fallback: no oneDNN bfloat16 on this CPU (no AVX-512).
    SPARSE_LAB_BF16_MATH=float32 or =native chooses either way (tests, and a comparison on one machine)."""
    chosen = os.environ.get("SPARSE_LAB_BF16_MATH")
    if chosen in ("float32", "native"):
        return chosen == "float32"
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def needed(dtype: torch.dtype, device: torch.device) -> bool:
    """True when a model of this dtype on this device computes its multi-token products in float32."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _slow_bf16_gemm()


@contextlib.contextmanager
def float32_products(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Float32Products around the block where `needed` (and not already active in this thread), else nothing."""
    active = any(isinstance(mode, Float32Products) for mode in torch.overrides._get_current_function_mode_stack())
    if active or not needed(dtype, device):
        yield
        return
    with Float32Products():
        yield


def wrap_forward(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Run `module`'s forward inside float32_products: its own calls and those of whoever calls it directly (a
    decoder layer replayed alone)."""
    inner = module.forward

    def forward(*args, **kwargs):
        with float32_products(dtype, device):
            return inner(*args, **kwargs)
    module.forward = forward
