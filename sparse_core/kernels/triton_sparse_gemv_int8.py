"""GPU backend of sparse_lab::sparse_linear_int8: the input-sparse GEMV over int8 rows with block scales.

The same walk as triton_sparse_gemv's `sparse_gemv` (each program owns BLOCK_N outputs, inputs in blocks of
BLOCK_K, rows of inputs inactive for every token masked out of the load and never read), over the int8 (in, out)
rows of quantize.py: BLOCK_K divides quantize.BLOCK, so a block of inputs shares one scale row, which multiplies
the block's products once. Activations in float32, as on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import quantize
from . import LIBRARY, UNION_TOKENS, check_int8_call
from .triton_sparse_gemv import INTERPRET

_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64})] if INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for n, k, w in ((16, 64, 2), (16, 64, 4), (32, 64, 4), (64, 64, 4), (128, 64, 4), (256, 32, 8))]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BATCH"])
@triton.jit
def _sparse_gemv_int8_kernel(x_ptr, q_ptr, s_ptr, thr_ptr, scalar_thr, bias_ptr, y_ptr, T, N, K,
                             SCALE_BLOCK: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BATCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        active = tl.max(keep.to(tl.int32), axis=0) > 0
        q = tl.load(q_ptr + k[:, None] * N + n[None, :], mask=active[:, None] & (n[None, :] < N), other=0).to(tl.float32)
        scale = tl.load(s_ptr + (k0 // SCALE_BLOCK) * N + n, mask=n < N, other=0.0)
        acc += tl.sum(x[:, :, None] * q[None, :, :], axis=1) * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b[:, None] * N + n[None, :], acc, mask=(b[:, None] < T) & (n[None, :] < N))


def sparse_linear_int8(x, q, scales, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear_int8 for CUDA (and the interpreter): union gather for few tokens, else the masked
    product over the dequantized weight."""
    per_token = check_int8_call(x, q, scales, threshold)
    if x.dtype != torch.float32:
        raise ValueError(f"sparse_linear_int8 takes float32 activations, not {x.dtype}.")
    x2 = x.reshape(-1, x.shape[-1])
    tokens, (K, N) = x2.shape[0], q.shape
    if tokens > UNION_TOKENS["cuda"]:
        limit = per_token.reshape(-1, 1) if per_token is not None else scalar_threshold
        weight = quantize.dequantize(q, scales)
        return F.linear(x2 * (x2.abs() > limit), weight, bias).reshape(*x.shape[:-1], N)
    y = torch.empty(tokens, N, dtype=x.dtype, device=x.device)
    thr = per_token.contiguous() if per_token is not None else y  # y: an unread placeholder pointer
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _sparse_gemv_int8_kernel[grid](x2.contiguous(), q, scales, thr, float(scalar_threshold),
                                   bias if bias is not None else y, y, tokens, N, K, SCALE_BLOCK=quantize.BLOCK,
                                   PER_TOKEN=per_token is not None, HAS_BIAS=bias is not None,
                                   BATCH=triton.next_power_of_2(tokens))
    return y.reshape(*x.shape[:-1], N)


LIBRARY.impl("sparse_linear_int8", sparse_linear_int8, "CUDA")
