"""What the pages show about a run, computed here without Streamlit so it can be unit-tested: the trace of a token
sequence for the heatmaps, the neuron view, a per-layer table and a per-layer timing of decode steps. The report a
stakeholder downloads is stakeholder_report.py.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import generate, machine, models, patch
from .patch import sparsity
from .spec import GROUPS, SparsitySpec
from .trace import SparsityCounter, Trace

MAX_TRACE_TOKENS = 256
MAX_HEATMAP_NEURONS = 512


# ---- traces for the heatmaps ------------------------------------------------------------------------
@dataclasses.dataclass
class TokenTrace:
    """One sparse forward pass over a token sequence, with everything the heatmaps show."""
    trace: Trace
    tokens: list[str]        # display text of each traced token
    spec: SparsitySpec | None
    layer: int               # the layer whose MLP intermediate activations were kept


def token_texts(model: models.SparseModel, ids: Sequence[int]) -> list[str]:
    return [model.tokenizer.decode([i]) for i in ids]


def trace_tokens(model: models.SparseModel, spec: SparsitySpec | None, ids: Sequence[int], layer: int,
                 max_tokens: int = MAX_TRACE_TOKENS, dense_prefix: int = 0) -> TokenTrace:
    """Trace the last `max_tokens` of `ids`: the first `dense_prefix` of them (a generation's dense prefill) dense,
    with their scores traced and nothing skipped, the rest with the spec, continuing from their cache. Every method
    decides per token, so this sees the same skips as the token-by-token generation that produced the ids."""
    model.check(spec)
    cut = max(0, len(ids) - max_tokens)
    ids, dense_prefix = list(ids)[cut:], min(max(0, dense_prefix - cut), len(ids) - cut)
    trace = Trace(activation_layer=layer)
    cache = None
    with torch.inference_mode():
        if dense_prefix and spec is not None:
            with sparsity(spec.zeroed(), [trace]):
                cache = model.model(torch.tensor([ids[:dense_prefix]], device=model.device), use_cache=True).cache
        else:
            dense_prefix = 0
        if dense_prefix < len(ids):
            with sparsity(spec, [trace]):
                model.model(torch.tensor([ids[dense_prefix:]], device=model.device), cache=cache, use_cache=False)
    return TokenTrace(trace, token_texts(model, ids), spec, layer)


def skipped_matrix(traced: TokenTrace, group: str) -> pd.DataFrame:
    """Layers x tokens: the fraction of `group`'s inputs skipped at each token."""
    frame = traced.trace.skipped_frame()
    return frame[frame["group"] == group].pivot(index="layer", columns="token", values="skipped")


@dataclasses.dataclass
class NeuronView:
    activations: np.ndarray   # tokens x shown neurons, |activation|, NaN where the neuron was skipped
    neurons: np.ndarray       # the neuron index of each column
    active_share: np.ndarray  # per shown neuron, the fraction of tokens where it was kept


def neuron_view(traced: TokenTrace, hot_first: bool = True, max_neurons: int = MAX_HEATMAP_NEURONS) -> NeuronView:
    """The traced layer's MLP intermediate, skipped cells masked; either in neuron index order or the most often
    active ("hot") neurons first, ties broken by the larger mean |activation| so the strongest lead. At most
    `max_neurons` columns, so big models stay drawable."""
    values, thresholds = traced.trace.activation_matrix()
    kept = values > thresholds
    share = kept.float().mean(0)
    if hot_first:
        by_strength = torch.argsort(values.mean(0), descending=True, stable=True)
        order = by_strength[torch.argsort(share[by_strength], descending=True, stable=True)]
    else:
        order = torch.arange(values.shape[1])
    order = order[:max_neurons]
    masked = torch.where(kept, values, torch.full_like(values, float("nan")))[:, order]
    return NeuronView(masked.numpy(), order.numpy(), share[order].numpy())


def threshold_marker(traced: TokenTrace, group: str) -> tuple[float | None, float]:
    """Where to draw the threshold on the |x| histogram of (traced layer, group), and the fraction skipped there.

    TEAL and CATS have one threshold; top-k's varies per token, so its marker is the single threshold that would
    skip the same share of this text. None when nothing is thresholded (dense, or CATS outside the MLP).
    """
    frame = traced.trace.skipped_frame()
    rows = frame[(frame["layer"] == traced.layer) & (frame["group"] == group)]
    below = float(rows["skipped"].mean()) if len(rows) else 0.0
    spec = traced.spec
    if spec is None or spec.is_dense or (spec.method == "cats" and group != "mlp_mid"):
        return None, below
    if spec.method == "topk":
        return traced.trace.histogram.quantile(traced.layer, group, below), below
    return spec.value(traced.layer, group), below


VISIBLE_WHITESPACE = str.maketrans({" ": "·", "\n": "↵", "\r": "↵", "\t": "⇥"})


def token_labels(tokens: Sequence[str], max_chars: int | None = 8) -> list[str]:
    """Tokens as axis labels: whitespace made visible (a leading space is how most tokenizers start a word) and,
    with `max_chars`, long ones cut with an ellipsis. Labels may repeat: charts place them at token positions."""
    visible = [token.translate(VISIBLE_WHITESPACE) for token in tokens]
    if max_chars is None:
        return visible
    return [label if len(label) <= max_chars else label[:max_chars - 1] + "…" for label in visible]


def color_range(values: np.ndarray, low_percentile: float, high_percentile: float) -> tuple[float | None, float | None]:
    """Colour-scale limits at two percentiles of the finite values, so a few outliers do not wash out the rest;
    (None, None), plotly's own min-max scale, when those percentiles coincide or nothing is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    low, high = np.percentile(finite, [low_percentile, high_percentile])
    return (float(low), float(high)) if high > low else (None, None)


# ---- the headline's words ----------------------------------------------------------------------------
def ppl_change(increase: float) -> str:
    """A perplexity change as people read it, on every surface: a percentage up to doubling, a factor beyond
    (×301, not +29953.3 %)."""
    ratio = increase + 1
    return f"{increase:+.1%}" if increase < 1.0 else f"×{ratio:.3g}" if ratio < 1000 else f"×{ratio:,.0f}"


def headline_sentence(quality, speed: dict | None) -> str:
    """The headline in one sentence, on the Playground and in the report: `quality` is the setting's
    metrics.Evaluation, `speed` its valid decode measurement or None."""
    skips = f"Skips {quality.weight_reads_skipped:.0%} of weight reads"
    cost = f"perplexity {ppl_change(quality.ppl_increase)}"
    if speed is None:
        return f"{skips} (bound ×{quality.bound:.2f}), {cost}; no valid decode measurement yet, so no speedup is claimed."
    pace = "faster" if speed["speedup"] >= 1 else "slower"
    return f"{skips}: ×{speed['speedup']:.2f} {pace} (bound ×{quality.bound:.2f}), {cost}."


def speed_provenance(speed: dict) -> str:
    """How a setting's decode speedup was measured, in one sentence beside it."""
    return (f"Decode speedup timed once on this machine with the {speed['decoder']}: {speed['sparse_tok_s']:.1f} "
            f"sparse against {speed['dense_tok_s']:.1f} tok/s on the fastest dense path ({speed['dense_path']}), "
            f"{speed['repeats']} interleaved runs of {speed['new_tokens']} greedy steps each.")


# ---- time per layer of a decode step ------------------------------------------------------------------
REST_DRIFT = 0.10  # the never-sparsified rest may differ this much between the runs before the timing is noisy


@dataclasses.dataclass(frozen=True)
class StepBreakdown:
    """Per-part decode step times, dense vs sparse, and why they are not a result (the decode benchmark's flags:
    above the bound or too noisy, and the never-sparsified rest moving between the runs), or None."""
    frame: pd.DataFrame  # part, dense_ms, sparse_ms (medians), dense_iqr_ms, sparse_iqr_ms
    speedup: float       # the whole step, dense median over sparse median
    bound: float         # 1/(1-s) for the share of weight reads the sparse run skipped
    flag: str | None
    rounds: int          # interleaved runs of each
    steps: int           # decode steps per run


def decode_step_breakdown(model: models.SparseModel, prompt: generate.Prompt, spec: SparsitySpec | None,
                          new_tokens: int = 8, rounds: int = 3) -> StepBreakdown:
    """Median wall time (ms) of each decoder layer over `rounds` x `new_tokens` decode steps, dense and `spec`
    interleaved round by round (so drift in the machine's pace hits both alike), timed with forward hooks; "rest" is
    embedding, final norm, output head and sampling. The prefill steps are left out. The bound comes from an untimed
    run with a counter (observers cost time)."""
    from . import bench, cost
    counter = SparsityCounter()
    list(generate.stream(model, prompt, spec, new_tokens + 1, stop_at_eos=False, observers=[counter]))
    bound = cost.token_cost(model, counter.weighted(model.skippable_params(spec.method if spec else "dense"))).bound
    runs = {"dense": None, "sparse": spec}
    layers = {run: [[] for _ in range(model.num_layers)] for run in runs}
    steps = {run: [] for run in runs}
    for round_ in range(rounds):
        for run in sorted(runs, reverse=bool(round_ % 2)):  # which goes first alternates
            per_layer, seconds = _timed_layers(model, prompt, runs[run], new_tokens)
            for index, times in enumerate(per_layer):
                layers[run][index] += times[1:]
            steps[run] += seconds[1:]
    columns = {}
    for run in runs:
        rest = [max(step - sum(parts), 0.0) for step, parts in zip(steps[run], zip(*layers[run]))]
        timings = [bench.Timing.of(times) for times in layers[run]] + [bench.Timing.of(rest)]
        columns[f"{run}_ms"] = [t.median for t in timings]
        columns[f"{run}_iqr_ms"] = [t.q3 - t.q1 for t in timings]
    frame = pd.DataFrame({"part": [f"layer {i}" for i in range(model.num_layers)] + ["rest"], **columns})
    dense_step, sparse_step = (bench.Timing.of(steps[run]) for run in runs)
    speedup = dense_step.median / sparse_step.median
    flag = bench.flag(speedup, bound, dense_step, sparse_step)
    rest_dense, rest_sparse = columns["dense_ms"][-1], columns["sparse_ms"][-1]
    if flag is None and rest_dense > 0 and abs(rest_sparse / rest_dense - 1) > REST_DRIFT:
        flag = (f"noisy: the never-sparsified rest took {rest_dense:.1f} ms dense and {rest_sparse:.1f} ms sparse "
                "(the machine's pace moved between the runs)")
    return StepBreakdown(frame.round(3), round(speedup, 3), round(bound, 3), flag, rounds, new_tokens)


def _timed_layers(model: models.SparseModel, prompt: generate.Prompt, spec: SparsitySpec | None,
                  new_tokens: int) -> tuple[list[list[float]], list[float]]:
    blocks = patch.decoder_layers(model.model)
    started: dict[int, float] = {}
    seconds: dict[int, list[float]] = defaultdict(list)
    device = model.device

    timing = threading.get_ident()  # the model is shared: other visitors' passes run these hooks too, and are not timed

    def start(index: int) -> None:
        if threading.get_ident() == timing:
            machine.synchronize(device)  # on a GPU the work queued before this layer is not its time
            started[index] = time.perf_counter()

    def stop(index: int) -> None:
        if threading.get_ident() == timing:
            machine.synchronize(device)
            seconds[index].append(time.perf_counter() - started[index])

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: start(i)))
        handles.append(block.register_forward_hook(lambda m, a, o, i=index: stop(i)))
    try:
        steps = [t.seconds for t in generate.stream(model, prompt, spec, new_tokens + 1, stop_at_eos=False)]
    finally:
        for handle in handles:
            handle.remove()
    return [seconds[i] for i in range(len(blocks))], steps


def per_layer_frame(model: models.SparseModel, counter: SparsityCounter, method: str) -> pd.DataFrame:
    """Achieved sparsity per layer (weight-read weighted) and per projection group, from a counter."""
    frame = pd.DataFrame({"layer": range(model.num_layers),
                          "skipped": counter.per_layer(model.skippable_params(method))})
    for group in GROUPS:
        frame[group] = [counter.fraction(layer, group) for layer in range(model.num_layers)]
    return frame
