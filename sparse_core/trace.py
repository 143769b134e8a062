"""Observers: what a forward pass can report about its sparsity, opt-in per call.

Each observer receives (layer, group, score, threshold) from the patched model (see patch.Observer). With no
observers in the call context the patched linears skip all of this, so tracing costs nothing when off.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pandas as pd
import torch

from . import ops
from .spec import GROUPS


def _skipped(score: torch.Tensor, threshold: ops.Threshold) -> torch.Tensor:
    return ~ops.above_threshold(score, threshold)


class SparsityCounter:
    """Counts skipped and total inputs per (layer, group): the achieved sparsity of a run, and the share skipped in
    each forward pass (one generated token each while decoding), for the live layer x token heatmap."""

    def __init__(self):
        self.skipped: dict[tuple[int, str], int] = defaultdict(int)
        self.total: dict[tuple[int, str], int] = defaultdict(int)
        self.per_pass: dict[tuple[int, str], list[float]] = defaultdict(list)

    def observe(self, layer, group, score, threshold):
        self.add(layer, group, int(_skipped(score, threshold).sum()), score.numel())

    def add(self, layer: int, group: str, skipped: int, total: int) -> None:
        """One forward pass's count for (layer, group): what `observe` takes from the scores, and what the fast
        decoder's compiled step counts itself."""
        self.skipped[layer, group] += skipped
        self.total[layer, group] += total
        self.per_pass[layer, group].append(skipped / max(total, 1))

    def pass_matrix(self, group: str, num_layers: int) -> list[list[float]]:
        """Layers x forward passes: the share of `group`'s inputs each pass skipped (the passes seen so far)."""
        passes = min((len(self.per_pass.get((layer, group), ())) for layer in range(num_layers)), default=0)
        return [self.per_pass[layer, group][:passes] for layer in range(num_layers)]

    def fraction(self, layer: int, group: str) -> float:
        total = self.total.get((layer, group), 0)
        return self.skipped[layer, group] / total if total else 0.0

    def weighted(self, group_params: tuple[dict[str, int], ...]) -> float:
        """Model-wide sparsity: the fraction of sparsifiable weight reads skipped (groups weighted by size)."""
        saved = sum(self.fraction(l, g) * n for l, per in enumerate(group_params) for g, n in per.items())
        total = sum(n for per in group_params for n in per.values())
        return saved / total if total else 0.0

    def per_layer(self, group_params: tuple[dict[str, int], ...]) -> list[float]:
        return [sum(self.fraction(l, g) * n for g, n in per.items()) / sum(per.values())
                for l, per in enumerate(group_params)]


class AbsHistogram:
    """Streaming histogram of log10|score| per (layer, group): quantiles for calibration, plots for the UI.

    Fixed log-spaced bins (1e-8 .. 1e4) make it deterministic and memory-bounded whatever the text length;
    with 6000 bins a quantile is within 0.5 % of the exact value.
    """
    LOW, HIGH, BINS = -8.0, 4.0, 6000

    def __init__(self, groups: tuple[str, ...] = GROUPS):
        self.groups = groups
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.zeros: dict[tuple[int, str], int] = defaultdict(int)

    def observe(self, layer, group, score, threshold):
        if group not in self.groups:
            return
        flat = score.detach().flatten().float()
        nonzero = flat[flat > 0]
        self.zeros[layer, group] += flat.numel() - nonzero.numel()
        logs = nonzero.log10().clamp_(self.LOW, self.HIGH - 1e-6)
        counts = torch.histc(logs, bins=self.BINS, min=self.LOW, max=self.HIGH).cpu()  # kept on the CPU, whatever the device
        key = (layer, group)
        self.counts[key] = self.counts[key] + counts if key in self.counts else counts

    def quantile(self, layer: int, group: str, q: float) -> float:
        """The |x| below which a fraction q of observed values lie (0 when q is covered by exact zeros)."""
        counts = self.counts.get((layer, group))
        zeros = self.zeros.get((layer, group), 0)
        if counts is None or q <= 0:
            return 0.0
        total = zeros + float(counts.sum())
        want = q * total - zeros
        if want <= 0:
            return 0.0
        cumulative = counts.double().cumsum(0)
        index = int(torch.searchsorted(cumulative, torch.tensor(want, dtype=torch.float64)))
        index = min(index, self.BINS - 1)
        before = float(cumulative[index - 1]) if index else 0.0
        inside = (want - before) / max(float(counts[index]), 1.0)
        width = (self.HIGH - self.LOW) / self.BINS
        return 10 ** (self.LOW + (index + min(inside, 1.0)) * width)

    def frame(self, layer: int, group: str, bins: int = 60) -> pd.DataFrame:
        """Coarse histogram for display: columns abs_low, abs_high, count (zeros in their own first row)."""
        counts = self.counts.get((layer, group))
        if counts is None:
            return pd.DataFrame(columns=["abs_low", "abs_high", "count"])
        nz = counts.nonzero().flatten()
        lo, hi = int(nz.min()), int(nz.max()) + 1
        step = max(1, math.ceil((hi - lo) / bins))
        width = (self.HIGH - self.LOW) / self.BINS
        rows = [(0.0, 0.0, self.zeros[layer, group])] if self.zeros[layer, group] else []
        for start in range(lo, hi, step):
            rows.append((10 ** (self.LOW + start * width), 10 ** (self.LOW + (start + step) * width),
                         int(counts[start:start + step].sum())))
        return pd.DataFrame(rows, columns=["abs_low", "abs_high", "count"])


class Trace:
    """What the heatmaps show: per (layer, group, token) skipped fraction; for one layer the MLP-intermediate
    |activation| (tokens x neurons) with its thresholds; |x| histograms per (layer, group)."""

    def __init__(self, activation_layer: int | None = None, max_neurons: int | None = None):
        self.activation_layer = activation_layer
        self.max_neurons = max_neurons
        self.skipped: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
        self.activations: list[torch.Tensor] = []   # chunks of (tokens, neurons) |score|
        self.activation_thresholds: list[torch.Tensor] = []  # matching (tokens, 1)
        self.histogram = AbsHistogram()

    def observe(self, layer, group, score, threshold):
        rows = score.detach().reshape(-1, score.shape[-1])
        self.skipped[layer, group].append(_skipped(score, threshold).float().mean(-1).reshape(-1).cpu())
        self.histogram.observe(layer, group, score, threshold)
        if group == "mlp_mid" and layer == self.activation_layer:
            kept = rows[:, : self.max_neurons] if self.max_neurons else rows
            self.activations.append(kept.float().cpu())
            per_token = threshold.reshape(-1, 1) if torch.is_tensor(threshold) else torch.full((rows.shape[0], 1), float(threshold))
            self.activation_thresholds.append(per_token.float().cpu())

    def skipped_frame(self) -> pd.DataFrame:
        """Long format: layer, group, token (position in the traced sequence), skipped fraction."""
        frames = []
        for (layer, group), chunks in sorted(self.skipped.items()):
            values = torch.cat(chunks).numpy()
            frames.append(pd.DataFrame({"layer": layer, "group": group, "token": range(len(values)), "skipped": values}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "group", "token", "skipped"])

    def activation_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens x neurons) |activation| of the chosen layer's MLP intermediate, and (tokens x 1) thresholds."""
        if not self.activations:
            return torch.empty(0, 0), torch.empty(0, 1)
        return torch.cat(self.activations), torch.cat(self.activation_thresholds)
