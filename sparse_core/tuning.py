"""Finding the best trade-off: greedy per-layer allocation of sparsity, and sweeps of quality against sparsity.

Greedy allocation (training-free, as published for TEAL): inside each block, start dense and repeatedly raise by
`step` the sparsity of the group whose block output error grows least per weight element it saves, until the block
reaches the target. Each block is replayed alone on its recorded dense input, so a step costs a few block forwards.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

import pandas as pd
import torch

from . import calibrate as calibration
from .metrics import QUALITY_TOKENS, measured
from .models import SparseModel, decoder_layers
from .patch import sparsity
from .spec import GROUPS, SparsitySpec
from .store import BoundedCache
from .trace import AbsHistogram

Progress = Callable[[int, int], None]
MAX_GROUP_SPARSITY = 0.95


class Cancelled(RuntimeError):
    """Raised between steps when the caller's cancel event is set."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Cancelled.")


def _record_blocks(model: SparseModel, ids: torch.Tensor) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, dense output) of every decoder block for one dense pass over `ids`."""
    records, handles = [], []
    for block in decoder_layers(model.model):
        def keep(module, args, kwargs, output):
            records.append((args, kwargs, (output[0] if isinstance(output, tuple) else output).clone()))
        handles.append(block.register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.inference_mode(), sparsity(None):
            model.model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return records


def greedy_targets(model: SparseModel, method: str, targets: Sequence[float], ids: torch.Tensor,
                   histogram: AbsHistogram | None, step: float = 0.1, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> dict[float, list[list[float]]]:
    """For each target, the [layer][group] sparsity table greedy allocation reaches.

    Every block reaches the target itself (weighted by the weight elements each group's sparsity skips), so the
    model-wide sparsity of those elements is the target too; inside a block the group whose next `step` raises the block's output
    error least per element saved goes first. One greedy walk serves all targets: at each target the walk is
    snapshotted, the last step shortened to land on it exactly. `histogram` maps a group's sparsity to its
    threshold (dense quantiles); None for top-k, whose spec values are sparsities.
    """
    groups = [g for g in (("mlp_mid",) if method == "cats" else GROUPS)]
    weights = model.skippable_params(method)
    blocks, layers = _record_blocks(model, ids), decoder_layers(model.model)
    goals = sorted(set(float(t) for t in targets))
    tables = {t: [[0.0] * len(GROUPS) for _ in range(model.num_layers)] for t in goals}

    def block_error(layer: int, row: list[float]) -> float:
        values = [[0.0] * len(GROUPS) for _ in range(model.num_layers)]
        values[layer] = [t if histogram is None else histogram.quantile(layer, g, t) for g, t in zip(GROUPS, row)]
        spec = SparsitySpec.from_tables(method, values, model.fingerprint)
        args, kwargs, dense = blocks[layer]
        with torch.inference_mode(), sparsity(spec):
            out = layers[layer](*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return float((out - dense).double().pow(2).sum())

    for layer in range(model.num_layers):
        total = sum(weights[layer][g] for g in groups)
        row, reached, base, pending = [0.0] * len(GROUPS), 0.0, 0.0, list(goals)

        def raise_cost(i: int) -> tuple[float, float]:
            raised = list(row)
            raised[i] += step
            error = block_error(layer, raised)
            return (error - base) / (step * weights[layer][GROUPS[i]]), error

        # Lazy greedy: costs measured at an earlier row are re-measured only when they come out on top.
        costs = {GROUPS.index(g): raise_cost(GROUPS.index(g))[0] for g in groups}
        while pending and costs:
            _check(cancel)
            i = min(costs, key=costs.get)
            cost, error = raise_cost(i)
            if any(cost > other for k, other in costs.items() if k != i):
                costs[i] = cost  # stale estimate was too optimistic: re-rank
                continue
            gain = step * weights[layer][GROUPS[i]] / total
            while pending and reached + gain >= pending[0] - 1e-12:  # snapshot, landing on the target exactly
                partial = list(row)
                partial[i] += (pending[0] - reached) * total / weights[layer][GROUPS[i]]
                tables[pending.pop(0)][layer] = [round(v, 6) for v in partial]
            row[i] += step
            reached, base = reached + gain, error
            costs[i] = cost
            if row[i] + step > MAX_GROUP_SPARSITY + 1e-9:
                del costs[i]
        for t in pending:  # unreachable within MAX_GROUP_SPARSITY: the most this block allows
            tables[t][layer] = [round(v, 6) for v in row]
        if progress:
            progress(layer + 1, model.num_layers)
    return tables


def greedy_specs(model: SparseModel, method: str, targets: Sequence[float], text: str | None = None,
                 tokens: int = 128, step: float = 0.1, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> dict[float, SparsitySpec]:
    """Greedy allocation on the calibration text, then thresholds for each table (with calibration's refinement)."""
    text = calibration.default_text("calibration") if text is None else text
    ids = calibration.token_chunks(model, text, tokens)[0]
    histogram = None if method == "topk" else calibration.score_histograms(model, method, text)
    tables = greedy_targets(model, method, targets, ids, histogram, step, progress, cancel)
    return {t: calibration.calibrate(model, method, table, text=text).with_provenance(allocation="greedy", target=f"{t:g}")
            for t, table in tables.items()}


# ---- sweeps ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPoint:
    method: str
    allocation: str
    target: float
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    kl: float
    top1_agreement: float
    achieved_sparsity: float
    weight_reads_skipped: float
    bound: float


MAX_CACHED_SWEEPS = 16  # sweeps are small tables, but visitors can ask for many; the oldest goes first
_SWEEPS = BoundedCache(MAX_CACHED_SWEEPS)


def sweep(model: SparseModel, methods: Sequence[str], targets: Sequence[float], allocations: Sequence[str] = ("uniform",),
          text: str | None = None, max_tokens: int = QUALITY_TOKENS, progress: Progress | None = None,
          cancel: threading.Event | None = None) -> pd.DataFrame:
    """Quality against sparsity: one row per (method, allocation, target) on held-out text, each point the
    setting's own stored measurement (metrics.measured); the table is cached per inputs."""
    text = calibration.default_text("evaluation") if text is None else text
    key = (model.fingerprint, model.layout, tuple(methods), tuple(targets), tuple(allocations), calibration.text_hash(text), max_tokens)
    cached = _SWEEPS.get(key)
    if cached is not None:
        return cached
    plan = [(m, a, t) for m in methods for a in allocations for t in targets]
    greedy = {m: greedy_specs(model, m, targets, cancel=cancel) for m in methods if "greedy" in allocations}
    rows = []
    for done, (method, allocation, target) in enumerate(plan):
        _check(cancel)
        spec = greedy[method][float(target)] if allocation == "greedy" else calibration.calibrate(model, method, target)
        result = measured(model, spec, text=text, max_tokens=max_tokens)
        rows.append(SweepPoint(method, allocation, target, result.ppl_dense, result.ppl_sparse,
                               result.ppl_sparse / result.ppl_dense, result.kl, result.top1_agreement,
                               result.achieved_sparsity, result.weight_reads_skipped, result.bound))
        if progress:
            progress(done + 1, len(plan))
    frame = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    return _SWEEPS.put(key, frame)
