"""GPU backend: Triton kernels for the input-sparse GEMV (TEAL, top-k) and CATS' output-sparse up projection.

`sparse_gemv`: x (T <= 4 tokens) against the (in, out) weight. Each program owns BLOCK_N outputs and every
SPLIT_K-th block of BLOCK_K inputs; the threshold is applied to x in the kernel and weight rows whose input is
inactive for every token are masked out of the load, so they are never read. Partial sums go to a float32 buffer
with atomic adds (Triton has no bfloat16 atomic add). Loaded values are cast to float32 at once: the interpreter
(TRITON_INTERPRET=1, used by the CPU tests) computes bfloat16 arithmetic wrongly otherwise.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import LIBRARY

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_UNION_TOKENS = 4  # beyond this the union of the masks rarely skips rows: masked dense matmul instead
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter runs one config (multi-config autotune needs a GPU to time on); big blocks keep it fast.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2})] if INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w)
    for n in (64, 128, 256) for k in (16, 32, 64) for s in (4, 8, 16) for w in (4,)]
_ROWS_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64})] if INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n in (16, 32, 64) for k in (64, 128, 256) for w in (4,)]


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "BATCH"], reset_to_zero=["y_ptr"])
@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, thr_ptr, y_ptr, T, N, K,
                        BATCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.arange(0, BATCH)
    thr = tl.load(thr_ptr + b, mask=b < T, other=float("inf")).to(tl.float32)
    acc = tl.zeros((BATCH, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + b[:, None] * K + k[None, :], mask=(b[:, None] < T) & (k[None, :] < K), other=0.0).to(tl.float32)
        keep = tl.abs(x) > thr[:, None]
        x = tl.where(keep, x, 0.0)
        active = tl.max(keep.to(tl.int32), axis=0) > 0  # the union over tokens: rows some token needs
        w = tl.load(w_ptr + k[:, None] * N + n[None, :], mask=active[:, None] & (n[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    tl.atomic_add(y_ptr + b[:, None] * N + n[None, :], acc, mask=(b[:, None] < T) & (n[None, :] < N))


@triton.autotune(configs=_ROWS_CONFIGS, key=["N", "K"])
@triton.jit
def _rows_kernel(x_ptr, w_ptr, keep_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's y[n] = keep[n] ? dot(w[n, :], x) : 0, loading only the kept rows of the (out, in) weight."""
    pid_n, t = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = tl.load(keep_ptr + t * N + n, mask=n < N, other=0) != 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=keep[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + t * N + n, acc, mask=n < N)


def sparse_linear(x, weight, weight_t, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear for CUDA (and the interpreter): union gather for few tokens, else masked dense."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens, (K, N) = x2.shape[0], weight_t.shape
    if threshold is None:  # compared in x's dtype, like the reference `x.abs() > threshold`
        threshold = torch.tensor(scalar_threshold, dtype=x.dtype, device=x.device).expand(tokens)
    if tokens > MAX_UNION_TOKENS:
        return F.linear(x2 * (x2.abs() > threshold.reshape(-1, 1)), weight, bias).reshape(*x.shape[:-1], N)
    thr = threshold.reshape(-1).float().contiguous()
    y = torch.zeros(tokens, N, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    _sparse_gemv_kernel[grid](x2.contiguous(), weight_t, thr, y, tokens, N, K, BATCH=triton.next_power_of_2(tokens))
    y = y if bias is None else y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def rows_linear(x, weight, bias, keep):
    """sparse_lab::rows_linear for CUDA (and the interpreter)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    (N, K), tokens = weight.shape, x2.shape[0]
    keep2 = keep.expand(*x.shape[:-1], N).reshape(tokens, N).to(torch.int8).contiguous()
    y = torch.empty(tokens, N, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), tokens)
    _rows_kernel[grid](x2, weight.contiguous(), keep2, y, N, K)
    y = y if bias is None else (y + bias) * keep2
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


LIBRARY.impl("sparse_linear", sparse_linear, "CUDA")
LIBRARY.impl("rows_linear", rows_linear, "CUDA")
