"""Finding the best trade-off: greedy per-layer allocation of sparsity, and sweeps of quality against sparsity.

Greedy allocation (training-free, as published for TEAL): inside each block, start dense and repeatedly raise by
`step` the sparsity of the group whose block output error grows least per weight element it saves, until the block
reaches the target. Each block is replayed alone on its recorded dense input, so a step costs a few block forwards.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from . import calibrate as calibration
from .metrics import DEFAULT_PROTOCOL, measured
from .models import SparseModel
from .patch import decoder_layers, sparsity
from .scheduler import JOB, SCHEDULER
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


HISTOGRAM_CHUNK_TOKENS = 512  # score_histograms' default chunk: one progress step each


def greedy_steps(model: SparseModel, method: str, targets: Sequence[float], text: str | None = None) -> int:
    """How many progress steps greedy_specs reports: each chunk of the histogram pass (none for top-k), each
    block's walk, each target's thresholds."""
    text = calibration.default_text("calibration") if text is None else text
    chunks = 0 if method == "topk" else len(calibration.token_chunks(model, text, HISTOGRAM_CHUNK_TOKENS,
                                                                      calibration.CALIBRATION_TOKENS))
    return chunks + model.num_layers + len(set(float(t) for t in targets))


def greedy_specs(model: SparseModel, method: str, targets: Sequence[float], text: str | None = None,
                 tokens: int = 128, step: float = 0.1, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> dict[float, SparsitySpec]:
    """Greedy allocation on the calibration text, then thresholds for each table (with calibration's refinement).
    Progress counts greedy_steps(...) steps: the histogram pass's chunks, each block, each target's calibration."""
    text = calibration.default_text("calibration") if text is None else text
    total = greedy_steps(model, method, targets, text)
    chunks = total - model.num_layers - len(set(float(t) for t in targets))
    report = progress or (lambda done, total: None)
    ids = calibration.token_chunks(model, text, tokens)[0]
    _check(cancel)
    histogram = None if method == "topk" else calibration.score_histograms(
        model, method, text, chunk_tokens=HISTOGRAM_CHUNK_TOKENS, progress=lambda done, _: _check(cancel) or report(done, total))
    report(chunks, total)  # also when the histogram was cached
    tables = greedy_targets(model, method, targets, ids, histogram, step,
                            lambda done, _: report(chunks + done, total), cancel)
    specs = {}
    for done, (t, table) in enumerate(tables.items(), chunks + model.num_layers + 1):
        _check(cancel)
        specs[t] = calibration.calibrate(model, method, table, text=text,
                                         progress=lambda *_: _check(cancel)).with_provenance(allocation="greedy", target=f"{t:g}")
        report(done, total)
    return specs


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
    protocol: str  # metrics.PROTOCOLS: which positions ran sparse and were scored
    held_out_tokens: int


MAX_CACHED_SWEEPS = 16  # sweeps are small tables, but visitors can ask for many; the oldest goes first
_SWEEPS = BoundedCache(MAX_CACHED_SWEEPS)


def sweep_points(model: SparseModel, methods: Sequence[str], targets: Sequence[float],
                 allocations: Sequence[str] = ("uniform",), text: str | None = None, max_tokens: int | None = None,
                 progress: Progress | None = None, cancel: threading.Event | None = None,
                 protocol: str = DEFAULT_PROTOCOL, turn: Callable[[], None] = lambda: None) -> Iterator[SweepPoint]:
    """The sweep's points, one (method, allocation, target) at a time, as each is measured. Progress counts one
    done/total over the whole sweep, greedy allocation's steps first (greedy_steps per method) and then one step per
    point, so it moves from the start; `cancel` stops it with Cancelled between steps, and `turn()`, called between
    chunks, may hold it there while other work goes first."""
    text = calibration.default_text("evaluation") if text is None else text
    plan = [(m, a, t) for m in methods for a in allocations for t in targets]
    greedy_methods = [m for m in methods if "greedy" in allocations]
    steps = [greedy_steps(model, m, targets) for m in greedy_methods]
    total = sum(steps) + len(plan)
    report = progress or (lambda done, total: None)
    report(0, total)
    greedy, offset = {}, 0
    for method, method_steps in zip(greedy_methods, steps):
        greedy[method] = greedy_specs(model, method, targets, cancel=cancel,
                                      progress=lambda done, _, offset=offset: turn() or report(offset + done, total))
        offset += method_steps
    for done, (method, allocation, target) in enumerate(plan, 1):
        _check(cancel)
        between_chunks = lambda done, total: _check(cancel) or turn()  # a Stop or a visitor: within a chunk
        spec = greedy[method][float(target)] if allocation == "greedy" else calibration.calibrate(
            model, method, target, progress=between_chunks)
        result = measured(model, spec, text=text, max_tokens=max_tokens, progress=between_chunks, protocol=protocol)
        point = SweepPoint(method, allocation, target, result.ppl_dense, result.ppl_sparse,
                           result.ppl_sparse / result.ppl_dense, result.kl, result.top1_agreement,
                           result.achieved_sparsity, result.weight_reads_skipped, result.bound, result.protocol,
                           result.held_out_tokens)
        report(offset + done, total)
        yield point


def points_frame(points: Sequence[SweepPoint]) -> pd.DataFrame:
    """A sweep's table: one row per point, the SweepPoint fields as columns (also for a partial sweep)."""
    columns = [field.name for field in dataclasses.fields(SweepPoint)]
    return pd.DataFrame([dataclasses.asdict(p) for p in points], columns=columns)


def sweep(model: SparseModel, methods: Sequence[str], targets: Sequence[float], allocations: Sequence[str] = ("uniform",),
          text: str | None = None, max_tokens: int | None = None, progress: Progress | None = None,
          cancel: threading.Event | None = None, on_point: Callable[[SweepPoint], None] | None = None,
          protocol: str = DEFAULT_PROTOCOL, turn: Callable[[], None] = lambda: None) -> pd.DataFrame:
    """Quality against sparsity: one row per (method, allocation, target) on held-out text, each point the
    setting's own stored measurement (metrics.measured); the table is cached per inputs. `on_point` receives each
    point as it is finished, so a caller that cancels (Cancelled is raised) keeps the points done so far; only a
    whole sweep is cached (a cached one returns at once, without calling progress or on_point)."""
    text = calibration.default_text("evaluation") if text is None else text
    key = (model.fingerprint, model.layout, tuple(methods), tuple(targets), tuple(allocations), calibration.text_hash(text), max_tokens, protocol)
    cached = _SWEEPS.get(key)
    if cached is not None:
        return cached
    points = []
    for point in sweep_points(model, methods, targets, allocations, text, max_tokens, progress, cancel, protocol, turn):
        points.append(point)
        if on_point:
            on_point(point)
    return _SWEEPS.put(key, points_frame(points))


@dataclasses.dataclass(eq=False)
class SweepJob:
    """A sweep running in a background thread (start_sweep), for a page that must stay responsive: the thread only
    updates this object (never the UI), and whoever holds it reads the progress, the points finished so far and the
    outcome. state: running, then finished (frame: the whole, cached table), stopped (cancel was set; frame: the
    points finished so far, not cached) or failed (error: one sentence)."""
    planned: int  # points the sweep will measure
    model: SparseModel | None = dataclasses.field(default=None, repr=False)  # what it measures on
    measured_on: str = ""  # the model as results name it (Lab.label)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: int = 0
    total: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    points: list[SweepPoint] = dataclasses.field(default_factory=list)
    state: str = "running"
    waiting: str | None = None  # what it waits behind now (scheduler), while another's work goes first
    error: str | None = None
    frame: pd.DataFrame | None = None
    thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def stop(self) -> None:
        """Ask the sweep to stop at its next step; the points finished so far are kept."""
        self.cancel.set()

    def seconds_left(self) -> float | None:
        """From the pace so far; None before the first step and after the last."""
        done, total = self.done, self.total
        return (time.monotonic() - self.started) / done * (total - done) if 0 < done < total else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sweep ends or `timeout` passes; True when it has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


def start_sweep(model: SparseModel, methods: Sequence[str], targets: Sequence[float],
                allocations: Sequence[str] = ("uniform",), text: str | None = None,
                max_tokens: int | None = None, protocol: str = DEFAULT_PROTOCOL, measured_on: str = "") -> SweepJob:
    """Run sweep(...) in a daemon thread and return its job at once (see SweepJob). It is a job in the scheduler's
    queue: background preparation holds still while it runs, and it holds still between chunks while a visitor's
    own request runs (a generation starts within one chunk), saying so in `waiting`."""
    methods, targets, allocations = list(methods), list(targets), list(allocations)
    job = SweepJob(planned=len(methods) * len(allocations) * len(targets), model=model, measured_on=measured_on)

    def progress(done: int, total: int) -> None:
        job.total, job.done = total, done

    def waiting(said: str | None) -> None:
        job.waiting = said

    def turn() -> None:
        SCHEDULER.wait_turn(JOB, waiting, give_up=job.cancel.is_set)

    def work() -> None:
        try:
            with SCHEDULER.running("a quality sweep", JOB, left=job.seconds_left):
                frame = sweep(model, methods, targets, allocations, text=text, max_tokens=max_tokens,
                              progress=progress, cancel=job.cancel, on_point=job.points.append, protocol=protocol,
                              turn=turn)
            job.total = job.total or job.planned  # a cached sweep reports no progress
            job.done, job.frame = job.total, frame
            job.state = "finished"
        except Cancelled:
            job.frame = points_frame(list(job.points))
            job.state = "stopped"
        except ValueError as err:  # a text too short to evaluate, a spec the model refuses: said in one sentence
            job.error = str(err)
            job.state = "failed"
        except Exception as err:  # noqa: BLE001 - the thread has no one to raise to: the page shows one sentence
            logging.getLogger(__name__).exception("sweep failed")  # the traceback goes to the server's log only
            job.error = f"The sweep failed ({type(err).__name__}: {err})."
            job.state = "failed"

    job.thread = threading.Thread(target=work, name="quality-sweep", daemon=True)
    job.thread.start()
    return job
