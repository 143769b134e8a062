"""Finding the best trade-off: greedy allocation of sparsity over layers and projection groups, and sweeps of quality
against sparsity.

Greedy allocation (training-free): first each unit's cost, the KL divergence of the model's next-token distributions
on calibration tokens when that one (layer, group) alone is sparse, at a few sparsities (unit_costs); then, starting
dense, the unit whose cost grows least per weight element it saves is raised step by step until the share of weight
reads skipped reaches the target (allocate). The cost is taken at the model's output, where the quality measurement
looks: TEAL's block-output error alone, tried first, left each block's error low and the model's perplexity higher
than uniform sparsity's (docs/PERFORMANCE.md), since it cannot see how much each block's error grows on its way to
the output; scaling each unit's block error by its block's measured sensitivity (output KL per unit of block error)
was fast and no better. So a unit's cost is the output KL itself: one batched forward pass a unit, all its
sparsities side by side, from its own block on, scoring the last half of the calibration tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
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
from .store import BoundedCache, DiskStore, digest
from .trace import AbsHistogram

Progress = Callable[[int, int], None]
MAX_GROUP_SPARSITY = 0.95
LEVELS = (0.2, 0.4, 0.6, 0.8, MAX_GROUP_SPARSITY)  # sparsities at which each unit's cost is measured
STEP = 0.05  # the allocation's step in one unit's sparsity


class Cancelled(RuntimeError):
    """Raised between steps when the caller's cancel event is set."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Cancelled.")


def _record_blocks(model: SparseModel, ids: torch.Tensor) -> list:
    """What every decoder block returned in one dense pass over `ids` (kept whole: a block replaced by its record
    hands the next one exactly what it would have)."""
    records, handles = [], []
    for block in decoder_layers(model.model):
        def keep(module, args, output):
            records.append(output)
        handles.append(block.register_forward_hook(keep))
    try:
        with torch.inference_mode(), sparsity(None):
            model.model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _rows(record, rows: int):
    """A batch-1 record as `rows` identical rows (views, no copies)."""
    if isinstance(record, torch.Tensor):
        return record.expand(rows, *record.shape[1:])
    return tuple(_rows(part, rows) for part in record) if isinstance(record, tuple) else record


@contextlib.contextmanager
def _dense_until(model: SparseModel, records: list, first: int, rows: int) -> Iterator[None]:
    """The blocks before `first` answer with their recorded dense outputs (as `rows` rows) instead of computing
    them: a pass that is sparse only from block `first` on costs only the blocks from there."""
    layers = decoder_layers(model.model)
    own = [layers[layer].__dict__.get("forward") for layer in range(first)]  # a wrapper of its own (bf16_math)
    for layer in range(first):
        layers[layer].forward = lambda *args, record=_rows(records[layer], rows), **kwargs: record
    try:
        yield
    finally:
        for layer, forward in enumerate(own):
            if forward is None:
                del layers[layer].forward
            else:
                layers[layer].forward = forward


@dataclasses.dataclass(frozen=True)
class _Probe:
    """A spec for a batch of identical rows in which one unit takes a different value in each row and every other
    unit is dense: all of a unit's LEVELS in one forward pass (the ops take a threshold per token)."""
    method: str
    unit: tuple[int, str]
    rows: torch.Tensor  # [batch, tokens, 1]: the unit's value in each row, as every token of that row sees it

    def value(self, layer: int, group: str):
        return self.rows if (layer, group) == self.unit else 0.0


def _log_probs(model: SparseModel, ids: torch.Tensor, spec, scored: int) -> torch.Tensor:
    """Log-probabilities of the next token at the last `scored` positions of each row, in float64."""
    with torch.inference_mode(), sparsity(spec):
        logits = model.model(ids, use_cache=False, **_last(model, scored)).logits[:, -scored:]
    return torch.log_softmax(logits.double(), dim=-1)


def _last(model: SparseModel, scored: int) -> dict:
    """Ask for the last `scored` positions' logits only where the model takes the argument (the head is costly)."""
    return {"logits_to_keep": scored} if "logits_to_keep" in inspect.signature(model.model.forward).parameters else {}


def unit_costs(model: SparseModel, method: str, ids: torch.Tensor, histogram: AbsHistogram | None,
               progress: Progress | None = None, cancel: threading.Event | None = None) -> dict[tuple[int, str], list[float]]:
    """For each unit (layer, group) the method thresholds: KL(dense ‖ sparse) of the model's next-token
    distributions at the last half of `ids`' positions (nats per token), with that unit alone at each of LEVELS
    (every other unit dense). One forward pass a unit, a row per level, from the unit's block on (the blocks before
    it answer from their records). `histogram` maps a sparsity to its threshold (dense quantiles); None for top-k,
    whose spec values are sparsities."""
    groups = ("mlp_mid",) if method == "cats" else GROUPS
    records = _record_blocks(model, ids)
    scored = max(1, ids.shape[-1] // 2)
    dense = _log_probs(model, ids, None, scored)
    batch = ids.expand(len(LEVELS), -1)
    costs = {}
    for layer in range(model.num_layers):
        with _dense_until(model, records, layer, len(LEVELS)):
            for group in groups:
                _check(cancel)
                values = [level if histogram is None else histogram.quantile(layer, group, level) for level in LEVELS]
                rows = torch.tensor(values, device=ids.device).view(-1, 1, 1).expand(-1, ids.shape[-1], 1)
                sparse = _log_probs(model, batch, _Probe(method, (layer, group), rows), scored)
                costs[layer, group] = (dense.exp() * (dense - sparse)).sum(-1).mean(-1).tolist()
        if progress:
            progress(layer + 1, model.num_layers)
    return costs


def _cost(curve: list[float], sparsity: float) -> float:
    """A unit's cost at `sparsity`, linear between its measured LEVELS (0 at 0)."""
    points = [(0.0, 0.0), *zip(LEVELS, curve)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if sparsity <= x1 + 1e-12:
            return y0 + (y1 - y0) * (sparsity - x0) / (x1 - x0)
    return points[-1][1]


def allocate(model: SparseModel, method: str, costs: dict[tuple[int, str], list[float]], targets: Sequence[float],
             step: float = STEP) -> dict[float, list[list[float]]]:
    """For each target, the [layer][group] sparsities that skip that share of the method's weight reads at the
    least summed cost: start dense and repeatedly raise by `step` the unit whose cost grows least per weight element
    it saves; at each target the walk is snapshotted, its last step shortened to land on it exactly (a target beyond
    MAX_GROUP_SPARSITY everywhere gets the most the walk reaches)."""
    weights = model.skippable_params(method)
    total = sum(weights[layer][group] for layer, group in costs)
    row = {unit: 0.0 for unit in costs}
    goals = sorted(set(float(t) for t in targets))
    tables, reached = {}, 0.0

    def snapshot(sparsities: dict) -> list[list[float]]:
        table = [[0.0] * len(GROUPS) for _ in range(model.num_layers)]
        for (layer, group), value in sparsities.items():
            table[layer][GROUPS.index(group)] = round(value, 6)
        return table

    def marginal(unit) -> float:
        now = row[unit]
        return (_cost(costs[unit], now + step) - _cost(costs[unit], now)) / (step * weights[unit[0]][unit[1]])

    open_units = [unit for unit in costs if weights[unit[0]][unit[1]] > 0]
    while goals and open_units:
        unit = min(open_units, key=marginal)
        gain = step * weights[unit[0]][unit[1]] / total
        while goals and reached + gain >= goals[0] - 1e-12:
            landed = dict(row)
            landed[unit] += (goals[0] - reached) * total / weights[unit[0]][unit[1]]
            tables[goals.pop(0)] = snapshot(landed)
        row[unit] += step
        reached += gain
        if row[unit] + step > MAX_GROUP_SPARSITY + 1e-9:
            open_units.remove(unit)
    for goal in goals:  # beyond what every unit at MAX_GROUP_SPARSITY skips
        tables[goal] = snapshot(row)
    return tables


def greedy_targets(model: SparseModel, method: str, targets: Sequence[float], ids: torch.Tensor,
                   histogram: AbsHistogram | None, step: float = STEP, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> dict[float, list[list[float]]]:
    """For each target, the [layer][group] sparsity table greedy allocation reaches (unit_costs, then allocate)."""
    return allocate(model, method, unit_costs(model, method, ids, histogram, progress, cancel), targets, step)


HISTOGRAM_CHUNK_TOKENS = 512  # score_histograms' default chunk: one progress step each
_COSTS = DiskStore("greedy_costs", 1)  # greedy_specs' unit costs, per model, weights, method and text


def greedy_steps(model: SparseModel, method: str, targets: Sequence[float], text: str | None = None) -> int:
    """How many progress steps greedy_specs reports: each chunk of the histogram pass (none for top-k), each
    layer's unit costs, each target's thresholds."""
    text = calibration.default_text("calibration") if text is None else text
    chunks = 0 if method == "topk" else len(calibration.token_chunks(model, text, HISTOGRAM_CHUNK_TOKENS,
                                                                      calibration.CALIBRATION_TOKENS))
    return chunks + model.num_layers + len(set(float(t) for t in targets))


def greedy_specs(model: SparseModel, method: str, targets: Sequence[float], text: str | None = None,
                 tokens: int = 128, step: float = STEP, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> dict[float, SparsitySpec]:
    """Greedy allocation on the calibration text, then thresholds for each table (with calibration's refinement).
    Progress counts greedy_steps(...) steps: the histogram pass's chunks, each layer's unit costs, each target's
    calibration. The unit costs are kept on disk per model, weights, method and text, so every target of every caller (the Tuner,
    the CLI, a sweep) is allocated from the same ones: one spec per target, whoever asks."""
    text = calibration.default_text("calibration") if text is None else text
    total = greedy_steps(model, method, targets, text)
    chunks = total - model.num_layers - len(set(float(t) for t in targets))
    report = progress or (lambda done, total: None)
    ids = calibration.token_chunks(model, text, tokens)[0]
    _check(cancel)
    histogram = None if method == "topk" else calibration.score_histograms(
        model, method, text, chunk_tokens=HISTOGRAM_CHUNK_TOKENS, progress=lambda done, _: _check(cancel) or report(done, total))
    report(chunks, total)  # also when the histogram was cached
    key = digest(model.fingerprint, model.weight_key, model.layout, method, calibration.text_hash(text), tokens, LEVELS)
    known = _COSTS.load(key)
    if known is None:
        measured = unit_costs(model, method, ids, histogram, lambda done, _: report(chunks + done, total), cancel)
        known = _COSTS.save(key, {"costs": [[layer, group, curve] for (layer, group), curve in measured.items()]})
    costs = {(layer, group): curve for layer, group, curve in known["costs"]}
    tables = allocate(model, method, costs, targets, step)
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
        if not SCHEDULER.wait_turn(JOB, waiting, give_up=job.cancel.is_set):  # stopped, or the server shuts down
            job.cancel.set()
            _check(job.cancel)

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
