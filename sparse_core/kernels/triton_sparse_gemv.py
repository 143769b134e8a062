"""GPU backend: Triton kernels for the input-sparse GEMV (TEAL, top-k) and CATS' output-sparse up projection.

`sparse_gemv`: x (T <= 4 tokens) against the (in, out) weight. Each program owns BLOCK_N outputs and walks all
inputs in blocks of BLOCK_K; the threshold is applied to x in the kernel and weight rows whose input is inactive for
every token are masked out of the load, so they are never read. The bias and the cast to x's dtype happen in the
same kernel, which writes each output once: no zero-filled buffer, no atomics, no follow-up launches.

The launchers are CUDA-graph capturable: a scalar threshold travels as a kernel argument (no tensor built from a
Python number), the only allocation is the output, and the configs are a small set that autotune picks from on
the first call of a shape (models.wrap makes that call at load, before any capture). Loaded values are cast
to float32 at once: the interpreter (TRITON_INTERPRET=1, used by the CPU tests) computes bfloat16 arithmetic
wrongly otherwise.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import LIBRARY, UNION_TOKENS, check_call, comparable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter runs one config (multi-config autotune needs a GPU to time on); big blocks keep it fast.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64})] if INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4) for n, k in ((16, 128), (32, 128), (32, 64), (64, 64))]
_ROWS_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64})] if INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4) for n, k in ((16, 128), (32, 128), (32, 256), (64, 128))]


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "BATCH"])
@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, s_ptr, thr_ptr, scalar_thr, bias_ptr, y_ptr, T, N, K,
                        PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, BATCH: tl.constexpr,
                        SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """SCALE_BLOCK > 0: w holds int8 rows whose weight is w * s[k // SCALE_BLOCK, n] (quantize.py)."""
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.arange(0, BATCH)
    if PER_TOKEN:
        thr = tl.load(thr_ptr + b, mask=b < T, other=float("inf")).to(tl.float32)
    else:
        thr = tl.zeros((BATCH,), dtype=tl.float32) + scalar_thr
    acc = tl.zeros((BATCH, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + b[:, None] * K + k[None, :], mask=(b[:, None] < T) & (k[None, :] < K), other=0.0).to(tl.float32)
        keep = tl.abs(x) > thr[:, None]
        x = tl.where(keep, x, 0.0)
        active = tl.max(keep.to(tl.int32), axis=0) > 0  # the union over tokens: rows some token needs
        read = active[:, None] & (n[None, :] < N)
        w = tl.load(w_ptr + k[:, None] * N + n[None, :], mask=read, other=0.0).to(tl.float32)
        if SCALE_BLOCK > 0:  # each row's scale row (a block's rows share one, read from cache)
            w = w * tl.load(s_ptr + (k[:, None] // SCALE_BLOCK) * N + n[None, :], mask=read, other=0.0)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=(b[:, None] < T) & (n[None, :] < N))


@triton.autotune(configs=_ROWS_CONFIGS, key=["N", "K"])
@triton.jit
def _rows_kernel(x_ptr, w_ptr, keep_ptr, bias_ptr, y_ptr, N, K,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's y[n] = keep[n] ? dot(w[n, :], x) + bias[n] : 0, loading only the kept rows of the (out, in) weight."""
    pid_n, t = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = tl.load(keep_ptr + t * N + n, mask=n < N, other=0) != 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=keep[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    acc = tl.where(keep, acc, 0.0)
    tl.store(y_ptr + t * N + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


def sparse_linear(x, weight, weight_t, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear for CUDA (and the interpreter): union gather for few tokens, else masked dense."""
    per_token = check_call(x, weight_t, threshold)
    return gather(x, weight_t, None, 0, lambda: weight, bias, per_token, scalar_threshold)


def gather(x, rows, scales, scale_block, weight, bias, per_token, scalar_threshold):
    """The union gather of (in, out) `rows` (int8 ones with their `scales`, one row per `scale_block` inputs) for
    few tokens; beyond, the masked product with `weight()`, the (out, in) weight they stand for."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens, (K, N) = x2.shape[0], rows.shape
    if tokens > UNION_TOKENS["cuda"]:  # the union of the masks rarely skips rows: masked dense
        limit = per_token.reshape(-1, 1) if per_token is not None else comparable(scalar_threshold, x.dtype)
        return F.linear(x2 * (x2.abs() > limit), weight(), bias).reshape(*x.shape[:-1], N)
    y = torch.empty(tokens, N, dtype=x.dtype, device=x.device)
    thr = per_token.contiguous() if per_token is not None else y  # y: an unread placeholder pointer
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _sparse_gemv_kernel[grid](x2.contiguous(), rows, scales if scales is not None else y, thr,
                              comparable(scalar_threshold, x.dtype), bias if bias is not None else y, y, tokens, N, K,
                              PER_TOKEN=per_token is not None, HAS_BIAS=bias is not None,
                              BATCH=triton.next_power_of_2(tokens), SCALE_BLOCK=scale_block)
    return y.reshape(*x.shape[:-1], N)


def rows_linear(x, weight, bias, keep):
    """sparse_lab::rows_linear for CUDA (and the interpreter)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    (N, K), tokens = weight.shape, x2.shape[0]
    keep2 = keep.expand(*x.shape[:-1], N).reshape(tokens, N).to(torch.int8).contiguous()
    y = torch.empty(tokens, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), tokens)
    _rows_kernel[grid](x2, weight.contiguous(), keep2, bias if bias is not None else y, y, N, K, HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], N)


LIBRARY.impl("sparse_linear", sparse_linear, "CUDA")
LIBRARY.impl("rows_linear", rows_linear, "CUDA")
