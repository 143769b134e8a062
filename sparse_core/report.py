"""What the dashboard shows, computed here without Streamlit so it can be unit-tested: the per-token cost of a
setting (weight bytes, multiply-adds, energy, the bound), the trace of a token sequence for the heatmaps, and a
per-layer timing of decode steps.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import generate, models
from .bench import model_bytes
from .patch import sparsity
from .spec import GROUPS, SparsitySpec
from .trace import SparsityCounter, Trace

# Assumption, not a measurement: moving one byte from DRAM costs about 20 pJ (order of magnitude for modern
# DRAM interfaces, ~2.5 pJ/bit; older DDR is several times higher). Batch-1 decoding is dominated by weight traffic,
# so bytes x this figure approximates the memory energy per token; arithmetic and caches are left out.
DRAM_PJ_PER_BYTE = 20.0
MAX_TRACE_TOKENS = 256
MAX_HEATMAP_NEURONS = 512


# ---- per-token cost --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenCost:
    """Weight traffic and multiply-adds of one decoded token, dense vs sparse. Every weight element read takes
    part in exactly one multiply(-add) per token, so multiply-adds count the elements read (attention over the
    context, which reads the KV cache rather than weights, is not included)."""
    dense_bytes: int
    sparse_bytes: int
    bytes_per_element: int
    pj_per_byte: float = DRAM_PJ_PER_BYTE

    @property
    def dense_macs(self) -> int:
        return self.dense_bytes // self.bytes_per_element

    @property
    def sparse_macs(self) -> int:
        return self.sparse_bytes // self.bytes_per_element

    @property
    def bound(self) -> float:
        """The most a memory-bound decoder can gain: dense bytes over sparse bytes."""
        return self.dense_bytes / self.sparse_bytes

    def energy_uj(self, num_bytes: int) -> float:
        return num_bytes * self.pj_per_byte * 1e-6

    def frame(self) -> pd.DataFrame:
        rows = [("weight bytes read", self.dense_bytes, self.sparse_bytes),
                ("multiply-adds", self.dense_macs, self.sparse_macs),
                ("memory energy (µJ)", self.energy_uj(self.dense_bytes), self.energy_uj(self.sparse_bytes))]
        table = pd.DataFrame(rows, columns=["per token", "dense", "sparse"])
        table["saved"] = 1.0 - table["sparse"] / table["dense"]
        return table


def token_cost(model: models.SparseModel, skipped: float, pj_per_byte: float = DRAM_PJ_PER_BYTE) -> TokenCost:
    """Cost per token when a fraction `skipped` of the sparsifiable weight reads is skipped (a model-wide sparsity,
    as `SparsityCounter.weighted(model.skippable_params(method))` measures it)."""
    total, sparsifiable = model_bytes(model)
    element = model.model.get_input_embeddings().weight.element_size()
    saved = int(round(skipped * sparsifiable / element)) * element
    return TokenCost(total, total - saved, element, pj_per_byte)


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
                 max_tokens: int = MAX_TRACE_TOKENS) -> TokenTrace:
    """Trace the last `max_tokens` of `ids` in one forward pass. Every method decides per token, so this sees
    the same skips as the token-by-token generation that produced the ids."""
    model.check(spec)
    ids = list(ids)[-max_tokens:]
    trace = Trace(activation_layer=layer)
    with torch.inference_mode(), sparsity(spec, [trace]):
        model.model(torch.tensor([ids], device=model.device), use_cache=False)
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
    """The traced layer's MLP intermediate, skipped cells masked; optionally the most often active ("hot")
    neurons first. At most `max_neurons` columns, so big models stay drawable."""
    values, thresholds = traced.trace.activation_matrix()
    kept = values > thresholds
    share = kept.float().mean(0)
    order = torch.argsort(share, descending=True, stable=True) if hot_first else torch.arange(values.shape[1])
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


# ---- time per layer of a decode step ------------------------------------------------------------------
def decode_step_breakdown(model: models.SparseModel, prompt: generate.Prompt, spec: SparsitySpec | None,
                          new_tokens: int = 8) -> pd.DataFrame:
    """Median wall time (ms) of each decoder layer over `new_tokens` decode steps, dense vs `spec`, timed with
    forward hooks; "rest" is embedding, final norm, output head and sampling. The prefill step is left out."""
    columns = {}
    for label, run_spec in (("dense_ms", None), ("sparse_ms", spec)):
        per_layer, steps = _timed_layers(model, prompt, run_spec, new_tokens)
        layer_ms = [statistics.median(t[1:] or t) * 1e3 for t in per_layer]
        rest = statistics.median(steps[1:] or steps) * 1e3 - sum(layer_ms)
        columns[label] = layer_ms + [max(rest, 0.0)]
    parts = [f"layer {i}" for i in range(model.num_layers)] + ["rest"]
    return pd.DataFrame({"part": parts, **columns})


def _timed_layers(model: models.SparseModel, prompt: generate.Prompt, spec: SparsitySpec | None,
                  new_tokens: int) -> tuple[list[list[float]], list[float]]:
    blocks = models.decoder_layers(model.model)
    started: dict[int, float] = {}
    seconds: dict[int, list[float]] = defaultdict(list)
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: started.__setitem__(i, time.perf_counter())))
        handles.append(block.register_forward_hook(lambda m, a, o, i=index: seconds[i].append(time.perf_counter() - started[i])))
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
