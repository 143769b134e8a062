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

from . import kernels, ops
from .quantize import Int8Columns, Int8Linear
from .spec import GROUPS, SparsitySpec


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
            return kernels.comparable(spec.value(layer, group), x.dtype)
        if spec.method == "topk":
            return ops.topk_threshold(x, ops.keep_count(spec.value(layer, group), x.shape[-1]))
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

    @property
    def int8(self) -> bool:
        """True when the weights are int8 rows (quantize.quantize_model): every product reads them through the int8
        op, the dense ones with a threshold of 0, since no float weight is kept."""
        return isinstance(self.inner, (Int8Linear, Int8Columns))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = _CALL.get()
        if call is None:
            if not self.int8:
                return self.dense(x)
            call = CallContext(None)
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
        decode steps (up to kernels.DENSE_GATHER_TOKENS tokens; a prefill runs F.linear either way). int8 rows have
        one route, the int8 op."""
        if self.int8:
            return self.inner(x)
        if ((route or self.dense_route) == "kernel" and self.kernels and x.numel() <= kernels.DENSE_GATHER_TOKENS * x.shape[-1]
                and ops.backend_for(x, self.weight) != "reference"):
            return self.run(ops.sparse_linear, x, 0.0)
        return self.inner(x)

    def skip_inputs(self, x: torch.Tensor, threshold: ops.Threshold) -> torch.Tensor:
        if self.int8:
            return self.inner(x, threshold)
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
        threshold = kernels.comparable(call.spec.value(self.layer, "mlp_mid"), active.dtype)
        score = active.abs()
        call.observe(self.layer, "mlp_mid", score, threshold)
        keep = ops.above_threshold(score, threshold)
        up = self.up_proj.keep_rows(x, keep)
        hidden = active * up  # zero wherever keep is False
        return self.down_proj.skip_inputs(hidden, 0.0)


# How the projections' single copy of weights is stored (docs/PERFORMANCE.md, "One copy of the weights"):
#   inputs: every projection as (in, out) rows, so TEAL and top-k skip reads in all seven; CATS skips down's rows.
#   cats:   the same, except up_proj keeps HF's (out, in) rows, so CATS also skips up's rows of inactive neurons
#           and TEAL/top-k read all of up (its input sparsity saves nothing there).
#   hf:     HF's own storage, untouched, and no kernels: every call runs HF's forward or the reference ops, so
#           0 % is bit-identical to a freshly loaded model (and nothing is faster).
LAYOUTS = ("inputs", "cats", "hf")

# Projection name inside a decoder block -> the group whose input it reads.
_LEAF_GROUP = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "c_attn": "attn_in",
    "o_proj": "attn_out", "out_proj": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "c_fc": "mlp_in", "fc1": "mlp_in",
    "down_proj": "mlp_mid", "fc2": "mlp_mid",
}


class ModelLoadError(RuntimeError):
    """The model could not be loaded or patched; the message is one sentence naming what was tried."""


def patch_model(model: nn.Module, layout: str = "inputs") -> tuple[int, bool, tuple[dict[str, int], ...], dict[str, int]]:
    """Replace every block projection with a SparseLinear (and gated MLPs with SparseGatedMLP), in place, once,
    and store its weights in the kernels' layout (replacing HF's storage, never beside it)."""
    check_layout(layout)
    layers = decoder_layers(model)
    gated_all, params, widths = True, [], {}
    for index, block in enumerate(layers):
        found: dict[str, int] = {}
        for qualified, module in list(block.named_modules()):
            parent_name, _, leaf = qualified.rpartition(".")
            group = _LEAF_GROUP.get(leaf)
            if leaf == "c_proj":  # GPT-2 uses the same name for attention-out and MLP-down
                group = "attn_out" if "attn" in parent_name else "mlp_mid"
            if group is None or not hasattr(module, "weight") or isinstance(module, SparseLinear):
                continue
            parent = block.get_submodule(parent_name) if parent_name else block
            wrapped = SparseLinear(module, index, group, records=group not in found, kernels=layout != "hf")
            setattr(parent, leaf, wrapped)
            found[group] = found.get(group, 0) + wrapped.weight.numel()
            widths[group] = wrapped.weight.shape[1]
        missing = [g for g in GROUPS if g not in found]
        if missing:
            raise ModelLoadError(f"This model family ({type(model).__name__}) is not supported: block {index} has no projection for {', '.join(missing)}.")
        mlp = getattr(block, "mlp", None)
        gated = mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        keeps_rows = mlp.up_proj if gated and layout == "cats" else None  # CATS reads up's (out, in) rows
        for linear in block.modules():
            if isinstance(linear, SparseLinear) and layout != "hf" and linear is not keeps_rows:
                adopt_input_rows(linear.inner)
        if layout != "hf":
            _share_inputs(block, skip=keeps_rows)
        if gated:
            block.mlp = SparseGatedMLP(mlp, index)
        gated_all &= gated
        params.append(found)
    return len(layers), gated_all, tuple(params), widths


# Projections of one module that read the same input: stored as one matrix and computed in one sparse call.
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _share_inputs(block: nn.Module, skip: nn.Module | None) -> None:
    """Join each set of _SHARED_INPUTS projections of the block into a SharedInput where they can be (not `skip`,
    the cats layout's up_proj, which keeps its own (out, in) rows for CATS' row kernel)."""
    for parent in list(block.modules()):
        for names in _SHARED_INPUTS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, SparseLinear) and m is not skip for m in members) and SharedInput.fusable(members):
                SharedInput(members)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ModelLoadError(f"Unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")


def adopt_input_rows(linear: nn.Module) -> None:
    """Store an nn.Linear's (out, in) weight as contiguous (in, out) rows, in place: the parameter becomes a
    transposed view of the new storage and the old storage is freed. GPT-2's Conv1D already is (in, out); weights
    that accelerate offloaded (meta) stay as they are and run the reference path.

    HF's forward is unchanged, but float32 matmuls on this layout round differently in the last bit from a freshly
    loaded model (the BLAS sums in another order), so "dense" in this package means this model, at 0 % sparsity."""
    weight = linear.weight
    if isinstance(linear, nn.Linear) and weight.device.type != "meta" and not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, found by its length (families name it differently)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    count = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelLoadError(f"Could not find the decoder blocks of {type(model).__name__} (expected {count} layers).")
