"""GPU launcher of sparse_lab::sparse_linear_int8: triton_sparse_gemv's input-sparse GEMV over the int8 (in, out)
rows of quantize.py, each row's weight its int8 values times its block's scale row, read beside it; activations in
float32, as on the CPU."""
from __future__ import annotations

import torch

from .. import quantize
from . import LIBRARY, check_int8_call
from .triton_sparse_gemv import gather


def sparse_linear_int8(x, q, scales, bias, threshold, scalar_threshold):
    """sparse_lab::sparse_linear_int8 for CUDA (and the interpreter): union gather for few tokens, else the masked
    product over the dequantized weight."""
    per_token = check_int8_call(x, q, scales, threshold)
    if x.dtype != torch.float32:
        raise ValueError(f"sparse_linear_int8 takes float32 activations, not {x.dtype}.")
    return gather(x, q, scales, quantize.BLOCK, lambda: quantize.dequantize(q, scales), bias, per_token,
                  scalar_threshold)


LIBRARY.impl("sparse_linear_int8", sparse_linear_int8, "CUDA")
