"""Patching a model once, then reading each call's spec from a context variable.

The model is shared between threads (browser sessions), so nothing about sparsity is stored on it. A call sets
`sparsity(spec, observers)` around its forward pass; every patched linear reads that context. Context variables
are per thread, so two threads with different specs never see each other's setting.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Protocol

import torch
from torch import nn

from . import ops
from .spec import SparsitySpec


class Observer(Protocol):
    """Sees, for one (layer, group), the score compared with the threshold (|x|, or |act(gate)| for CATS)."""

    def observe(self, layer: int, group: str, score: torch.Tensor, threshold: ops.Threshold) -> None: ...


# How a patched linear computes a dense product (nothing to skip): "kernel" runs the sparse kernel with nothing
# skipped, "linear" runs HF's own forward (F.linear). Which is faster depends on the device, dtype and layout, so a
# model measures it once (models.choose_dense_route) and a call may override it (benchmarks time both).
DENSE_ROUTES = ("kernel", "linear")


@dataclasses.dataclass(frozen=True)
class CallContext:
    spec: SparsitySpec | None
    observers: tuple[Observer, ...] = ()
    dense_route: str | None = None  # None: each linear's own (the model's measured choice)
    # SharedInput -> [input, joint output, members yet to read it]: the members after the first read their slice
    computed: dict = dataclasses.field(default_factory=dict, compare=False)

    def threshold(self, layer: int, group: str, x: torch.Tensor) -> ops.Threshold:
        spec = self.spec
        if spec is None or spec.method == "dense":
            return 0.0
        if spec.method == "teal":
            return spec.value(layer, group)
        if spec.method == "topk":
            return ops.topk_threshold(x, spec.value(layer, group))
        return 0.0  # cats: only the gated MLP intermediate is thresholded, in SparseGatedMLP

    def observe(self, layer: int, group: str, score: torch.Tensor, threshold: ops.Threshold) -> None:
        for observer in self.observers:
            observer.observe(layer, group, score, threshold)


_CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("sparse_core_call", default=None)


@contextlib.contextmanager
def sparsity(spec: SparsitySpec | None, observers: tuple[Observer, ...] | list[Observer] = (),
             dense_route: str | None = None) -> Iterator[None]:
    """Run the forward passes inside this block with `spec` (None = dense), these observers and, when given, this
    dense route instead of the model's own.

    Keep the block around forward calls only, not across a generator's `yield`, so interleaved generators
    (dense and sparse streamed side by side) never swap contexts.
    """
    if dense_route not in (None, *DENSE_ROUTES):
        raise ValueError(f"Unknown dense route {dense_route!r}; choose one of {', '.join(DENSE_ROUTES)}.")
    token = _CALL.set(CallContext(spec, tuple(observers), dense_route))
    try:
        yield
    finally:
        _CALL.reset(token)


class SparseLinear(nn.Module):
    """Wraps an nn.Linear (or GPT-2's transposed Conv1D) and routes it through `ops.sparse_linear`; with
    `kernels=False` (the "hf" layout) every call stays on HF's forward or the reference ops."""

    def __init__(self, inner: nn.Module, layer: int, group: str, records: bool, kernels: bool = True):
        super().__init__()
        self.inner, self.layer, self.group, self.records, self.kernels = inner, layer, group, records, kernels
        self.transposed = not isinstance(inner, nn.Linear)  # Conv1D stores weight as (in, out)
        self.dense_route = "linear"  # set once at load by models.choose_dense_route
        self.shared: SharedInput | None = None  # set by SharedInput: this projection is computed with its siblings
        self.columns = slice(None)               # ... and is these columns of their joint output

    @property
    def weight(self) -> torch.Tensor:
        """(out_features, in_features), a view: no copy of the weights."""
        return self.inner.weight.t() if self.transposed else self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = _CALL.get()
        if call is None:
            return self.dense(x)
        if self.shared is not None:
            return self.shared(call, x)[..., self.columns]
        return self.compute(call, x)

    def compute(self, call: CallContext, x: torch.Tensor) -> torch.Tensor:
        """This projection's output under the call's spec: thresholded, observed, then skipped or dense."""
        threshold = call.threshold(self.layer, self.group, x)
        if self.records and call.observers:
            call.observe(self.layer, self.group, x.abs(), threshold)
        if isinstance(threshold, float) and threshold == 0.0:
            return self.dense(x, call.dense_route)  # nothing to skip: exact zeros contribute nothing
        return self.skip_inputs(x, threshold)

    def dense(self, x: torch.Tensor, route: str | None = None) -> torch.Tensor:
        """The dense product by `route` (default: this linear's measured one). "linear" is HF's own forward,
        bit-identical to HF on this storage; "kernel" reads every row through the kernel, where one runs, for
        decode steps (up to ops.DENSE_GATHER_TOKENS tokens; a prefill runs F.linear either way)."""
        if ((route or self.dense_route) == "kernel" and self.kernels and x.numel() <= ops.DENSE_GATHER_TOKENS * x.shape[-1]
                and ops.backend_for(x, self.weight) != "reference"):
            return self.run(ops.sparse_linear, x, 0.0)
        return self.inner(x)

    def skip_inputs(self, x: torch.Tensor, threshold: ops.Threshold) -> torch.Tensor:
        return self.run(ops.sparse_linear if self.kernels else ops.reference_sparse_linear, x, threshold)

    def keep_rows(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:  # computed already, with its sibling (gate|up), in the inputs layout
            return self(x) * keep
        return self.run(ops.rows_linear if self.kernels else ops.reference_rows_linear, x, keep)

    def run(self, op, x: torch.Tensor, *args) -> torch.Tensor:
        """op(x, weight, bias, *args) on this linear's weights. When accelerate placed or offloaded the linear
        (device_map), its hook brings the weights (and x) onto the execution device around the call, exactly as
        around the linear's own forward."""
        hook = getattr(self.inner, "_hf_hook", None)
        if hook is None:
            return op(x, self.weight, self.bias, *args)
        (x,), _ = hook.pre_forward(self.inner, x)
        return hook.post_forward(self.inner, op(x, self.weight, self.bias, *args))


class SharedInput:
    """Projections that read the same input (q|k|v, gate|up) stored as one (in, sum of outs) matrix, so one sparse
    call thresholds, masks and gathers for all of them: 4 calls per decoder layer instead of 7. The members' own
    weights become column views of that one matrix (no second copy), so HF's forward and every reference still see
    each projection as before; the first member called computes the joint output and the others slice it.

    A plain object, not a module: the joint matrix is not a parameter of its own (it is the members' storage)."""

    def __init__(self, members: list[SparseLinear]):
        first = members[0]
        rows = torch.cat([m.weight.t() for m in members], dim=1).contiguous()  # (in, total out): the kernels' layout
        biases = [m.bias for m in members]
        bias = torch.cat(biases) if biases[0] is not None else None
        joint = nn.Linear(rows.shape[0], rows.shape[1], bias=bias is not None, device="meta", dtype=rows.dtype)
        joint.weight = nn.Parameter(rows.t(), requires_grad=False)
        if bias is not None:
            joint.bias = nn.Parameter(bias, requires_grad=False)
        self.linear = SparseLinear(joint, first.layer, first.group, records=any(m.records for m in members),
                                   kernels=first.kernels)
        self.members = len(members)
        start = 0
        for member in members:
            width = member.weight.shape[0]
            member.inner.weight.data = rows[:, start:start + width].t()
            if bias is not None:
                member.inner.bias.data = bias[start:start + width]
            member.shared, member.columns = self, slice(start, start + width)
            start += width

    def __call__(self, call: CallContext, x: torch.Tensor) -> torch.Tensor:
        """The joint output for `x`: computed by the first member called, found by the others, and forgotten after
        the last (a long prefill's outputs are not kept for the whole pass). The entry holds x, so `is` cannot match
        a new tensor at a recycled address."""
        known = call.computed.get(self)
        if known is not None and known[0] is x:
            known[2] -= 1
            if known[2] == 0:
                del call.computed[self]
            return known[1]
        y = self.linear.compute(call, x)
        call.computed[self] = [x, y, self.members - 1]
        return y

    @staticmethod
    def fusable(members: list[SparseLinear]) -> bool:
        """Same input width, dtype and device, all with a bias or none, kernels on, and no accelerate hook or
        offloaded (meta) weight: accelerate moves each projection's weights itself."""
        weights = [m.weight for m in members]
        return (len(members) > 1 and all(m.kernels and not m.transposed and getattr(m.inner, "_hf_hook", None) is None
                                         for m in members)
                and len({(w.shape[1], w.dtype, w.device) for w in weights}) == 1 and weights[0].device.type != "meta"
                and len({m.bias is None for m in members}) == 1)


class SparseGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with the CATS path: threshold |act(gate(x))| and skip those neurons' up rows
    and down columns. Other methods pass through the patched linears unchanged."""

    def __init__(self, mlp: nn.Module, layer: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn, self.layer = mlp.act_fn, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = _CALL.get()
        if call is None or call.spec is None or call.spec.method != "cats":
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        active = self.act_fn(self.gate_proj(x))
        threshold = call.spec.value(self.layer, "mlp_mid")
        score = active.abs()
        call.observe(self.layer, "mlp_mid", score, threshold)
        keep = ops.keep_mask(score, threshold)
        up = self.up_proj.keep_rows(x, keep)
        hidden = active * up  # zero wherever keep is False
        return self.down_proj.skip_inputs(hidden, 0.0)
