"""int8 weights with one scale per output and per block of BLOCK inputs, stored as the kernels' (in, out) rows.

    W[o, i] = q[i, o] * scales[i // BLOCK, o]        q int8 in -127..127, scales float32

A skipped input still skips its row, now a quarter of float32's bytes. The scales sit in blocks along the input
(as llama.cpp's Q8_0 blocks do) because a weight column's range varies along the input far more than a row's: one
scale per input row fails the quality bar three times over, blocks of 64 keep SmolLM2's dense perplexity within
0.3 % of float32 (docs/QUANTIZATION.md). A block's scale row is read once beside its rows; float32 scales cost
4 bytes per 64 weights, 1.0625 bytes a weight, the same as Q8_0's.
"""
from __future__ import annotations

import torch
from torch import nn

BLOCK = 64  # inputs per scale


def blocks(inputs: int) -> int:
    return -(-inputs // BLOCK)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of an (out, in) weight: q the contiguous (in, out) int8 rows, scales (blocks, out) float32, each
    the block's largest |w| / 127 (symmetric, round to nearest even), computed in float32."""
    out, inputs = weight.shape
    padded = blocks(inputs) * BLOCK
    rows = torch.zeros(padded, out, dtype=torch.float32, device=weight.device)
    rows[:inputs] = weight.t().float()
    grouped = rows.view(-1, BLOCK, out)
    scales = grouped.abs().amax(dim=1) / 127.0
    q = torch.where(scales[:, None] > 0, grouped / scales[:, None].clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = q.round().clamp(-127, 127).to(torch.int8).view(padded, out)[:inputs].contiguous()
    return q, scales.contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the int8 rows stand for, in `dtype` (float64 for the tests' reference)."""
    inputs = q.shape[0]
    per_row = scales.to(dtype).repeat_interleave(BLOCK, dim=0)[:inputs]
    return (q.to(dtype) * per_row).t()


class Int8Linear(nn.Module):
    """A linear whose weight is int8 rows and block scales, stored once: the op reads the rows of the inputs above
    the threshold (ops.sparse_linear_int8). `weight` dequantizes for whatever inspects it; no forward uses it."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.q = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = q.shape

    @classmethod
    def of(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize(linear.weight.detach()), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.q, self.scales)

    def forward(self, x: torch.Tensor, threshold=0.0) -> torch.Tensor:
        from .ops import sparse_linear_int8
        return sparse_linear_int8(x, self.q, self.scales, self.bias, threshold)


class Int8Columns(nn.Module):
    """A projection stored inside its joint int8 matrix (patch.SharedInput computes it with its siblings): its
    columns, for whatever inspects its weight."""

    def __init__(self, joint: Int8Linear, columns: slice):
        super().__init__()
        self.joint, self.columns = joint, columns

    @property
    def weight(self) -> torch.Tensor:
        return self.joint.weight[self.columns]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.joint.bias is None else self.joint.bias[self.columns]


class Int8Embedding(nn.Module):
    """The input embedding tied to an int8 lm_head: a token's row is the head's column, read and dequantized (one
    copy of the weights serves both, as the float model's tied matrix does)."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        columns = self.head.q[:, ids.reshape(-1)].float()  # (hidden, tokens)
        scales = self.head.scales[:, ids.reshape(-1)].repeat_interleave(BLOCK, dim=0)[:columns.shape[0]]
        return (columns * scales).t().reshape(*ids.shape, -1)


def quantize_model(model: nn.Module) -> None:
    """Store a patched model's projections and its lm_head (and a tied input embedding) as int8 rows, in place, and
    free their float weights: each joint q|k|v and gate|up matrix once, its members pointing at the joint rows."""
    from .patch import SparseLinear
    joint = {}
    for module in list(model.modules()):
        if isinstance(module, SparseLinear):
            target = module.shared.linear if module.shared is not None else module
            if id(target) not in joint:
                joint[id(target)] = target.inner = Int8Linear.of(target.inner)
            if module is not target:
                module.inner = Int8Columns(joint[id(target)], module.columns)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    head = Int8Linear.of(model.get_output_embeddings())
    model.set_output_embeddings(head)
    if tied:
        model.set_input_embeddings(Int8Embedding(head))
