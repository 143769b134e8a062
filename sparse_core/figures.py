"""The lab's plotly figures, Streamlit-free, so the Playground, the Heatmaps page and the stakeholder report draw
the same charts the same way: tokens as words under their columns, colour scales fitted to the data."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .views import NeuronView, color_range, token_labels
from .spec import GROUPS

GROUP_TITLES = {"attn_in": "Attention input (q, k, v)", "attn_out": "Attention output (o)",
                "mlp_in": "MLP input (gate, up)", "mlp_mid": "MLP intermediate (down)"}
MAX_TOKEN_TICKS = 64  # word labels that fit under a full-width chart; beyond this every n-th token is labelled
# Plotly's toolbar floats over the top right ~30 px of a chart: a chart with titles at its top keeps them below it
# (and room at the bottom for the x labels, which a fixed-height chart in the report would otherwise clip).
TITLED_MARGIN = dict(t=80, b=40)
SKIPPED_GREY = "#9ca3af"  # plot background, so the NaN (skipped) cells of the neuron view show as grey


def token_axis(tokens: Sequence[str], max_ticks: int = MAX_TOKEN_TICKS) -> dict:
    """An x axis with the token words under their columns (every n-th when there are many). The values stay
    token positions, so a word that occurs twice keeps two columns."""
    labels = token_labels(tokens)
    shown = range(0, len(labels), max(1, math.ceil(len(labels) / max_ticks)))
    return dict(tickmode="array", tickvals=list(shown), ticktext=[labels[i] for i in shown],
                tickangle=-60, tickfont=dict(size=10), automargin=True)


def skipped_heatmap(matrix: np.ndarray, tokens: Sequence[str], first_generated: int | None = None,
                    height: int = 420) -> go.Figure:
    """Layers x tokens, the share of one group's inputs skipped; colours span the 2nd-98th percentile."""
    words = token_labels(tokens, max_chars=None)
    zmin, zmax = color_range(matrix, 2, 98)
    figure = go.Figure(go.Heatmap(z=matrix, x=list(range(len(words))), zmin=zmin, zmax=zmax,
                                  customdata=[words] * len(matrix), colorscale="Teal",
                                  colorbar=dict(title="skipped", tickformat=".0%"),
                                  hovertemplate="layer %{y}, token %{x} %{customdata}<br>skipped %{z:.0%}<extra></extra>"))
    if first_generated:
        figure.add_vline(x=first_generated - 0.5, line_dash="dash", annotation_text="generated →")
    figure.update_layout(height=height, margin=dict(t=30, b=10), xaxis=dict(title="token", **token_axis(tokens)),
                         yaxis_title="layer")
    return figure


def live_heatmaps(matrices: dict[str, np.ndarray], tokens: Sequence[str], height: int = 520) -> go.Figure:
    """Small multiples, one per projection group: layers x generated tokens, the share skipped while producing each
    token, on one colour scale fitted to all four (2nd-98th percentile)."""
    figure = make_subplots(rows=2, cols=2, subplot_titles=[GROUP_TITLES[g] for g in GROUPS], shared_yaxes=True,
                           horizontal_spacing=0.06, vertical_spacing=0.22)
    everything = np.concatenate([np.asarray(m, dtype=float).ravel() for m in matrices.values()]) if matrices else np.empty(0)
    zmin, zmax = color_range(everything, 2, 98)
    for index, group in enumerate(GROUPS):  # no per-cell hover text: this figure is resent several times a second
        matrix = np.asarray(matrices.get(group, []), dtype=float)
        row, col = divmod(index, 2)
        figure.add_trace(go.Heatmap(z=matrix, zmin=zmin, zmax=zmax, colorscale="Teal", showscale=index == 0,
                                    colorbar=dict(title="skipped", tickformat=".0%"),
                                    hovertemplate="layer %{y}, token %{x}<br>skipped %{z:.0%}<extra></extra>"),
                         row=row + 1, col=col + 1)
        figure.update_xaxes(token_axis(tokens, max_ticks=24), row=row + 1, col=col + 1)
        figure.update_yaxes(title_text="layer" if col == 0 else None, row=row + 1, col=col + 1)
    figure.update_layout(height=height, margin=TITLED_MARGIN)
    return figure


def neuron_heatmap(neurons: NeuronView, tokens: Sequence[str], height: int = 520) -> go.Figure:
    """Neurons x tokens of one layer's MLP intermediate: |activation|, skipped cells grey, the first neuron of the
    view at the top; colours stop at the 1st and 99th percentile of the kept values."""
    words = token_labels(tokens, max_chars=None)
    zmin, zmax = color_range(neurons.activations, 1, 99)
    figure = go.Figure(go.Heatmap(z=neurons.activations.T, x=list(range(len(words))), y=[str(n) for n in neurons.neurons],
                                  zmin=zmin, zmax=zmax, customdata=[words] * len(neurons.neurons), colorscale="Viridis",
                                  colorbar=dict(title="|activation|<br>1st–99th pct"),
                                  hovertemplate="neuron %{y}, token %{x} %{customdata}<br>|activation| %{z:.3g}<extra></extra>"))
    figure.update_layout(height=height, margin=dict(t=30, b=10), xaxis=dict(title="token", **token_axis(tokens)),
                         plot_bgcolor=SKIPPED_GREY, yaxis=dict(title="neuron", type="category", autorange="reversed"))
    return figure


def speed_figure(dense_tok_s: float, sparse_tok_s: float, bound: float, speedup: float | None = None,
                 limits: tuple[float, float] | None = None) -> go.Figure:
    """Dense and sparse decode rates next to the best sparse rate the bound allows (dense × bound), so a reader sees
    both the gain and how far it is from what skipping those weight reads could give at most. Pass `speedup` only when
    it is a valid measurement: it then labels the sparse bar; a missing or flagged one leaves the bar unlabelled.
    `limits` (dense, sparse tok/s) are the memory-bandwidth limits, each drawn as a line over its bar: the measured
    read bandwidth over the weight bytes that run reads per token."""
    figure = go.Figure(go.Bar(x=["dense", "sparse"], y=[dense_tok_s, sparse_tok_s], marker_color=["#8da0b3", "#2f7ed8"],
                              text=["", "" if speedup is None else f"×{speedup:.2f}"], textposition="outside"))
    figure.add_hline(y=dense_tok_s * bound, line_dash="dash", line_color="#d62728",
                     annotation_text=f"bound ×{bound:.2f}", annotation_position="top left")
    top = max(dense_tok_s * bound, sparse_tok_s)
    for column, limit in enumerate(limits or ()):
        figure.add_shape(type="line", x0=column - 0.45, x1=column + 0.45, y0=limit, y1=limit,
                         line=dict(color="#111827", dash="dot"))
        figure.add_annotation(x=column, y=limit, text=f"bandwidth limit {limit:.0f} tok/s", showarrow=False, yshift=10)
        top = max(top, limit)
    figure.update_layout(yaxis_title="tokens/s", yaxis_range=[0, top * 1.15], margin=dict(t=30, b=40), showlegend=False)
    return figure


def decode_speed_figure(decode: dict) -> go.Figure:
    """A decode measurement (bench.decode_result) as every surface draws it: both rates, the bound, the speedup and
    the memory-bandwidth limits."""
    return speed_figure(decode["dense_tok_s"], decode["sparse_tok_s"], decode["bound"], decode["speedup"],
                        bandwidth_limits(decode))


def bandwidth_limits(decode: dict) -> tuple[float, float]:
    """(dense, sparse) tok/s at the measured read bandwidth, from a decode measurement (bench.decode_result)."""
    return tuple(decode["bandwidth_gbs"] * 1e9 / decode[key]
                 for key in ("weight_bytes_per_token", "sparse_weight_bytes_per_token"))


def quality_figure(ppl_dense: float, ppl_sparse: float, top1_agreement: float) -> go.Figure:
    """The quality cost next to the speed: perplexity of both models, and how often the sparse model's top token is
    the dense model's."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Perplexity (lower is better)", "Top-1 agreement with dense"))
    figure.add_trace(go.Bar(x=["dense", "sparse"], y=[ppl_dense, ppl_sparse], marker_color=["#8da0b3", "#2f7ed8"],
                            text=[f"{ppl_dense:.2f}", f"{ppl_sparse:.2f}"], textposition="outside"), row=1, col=1)
    figure.add_trace(go.Bar(x=["sparse"], y=[top1_agreement], marker_color="#2f7ed8",
                            text=[f"{top1_agreement:.0%}"], textposition="outside"), row=1, col=2)
    figure.update_yaxes(range=[0, max(ppl_dense, ppl_sparse) * 1.2], row=1, col=1)
    figure.update_yaxes(range=[0, 1.1], tickformat=".0%", row=1, col=2)
    figure.update_layout(margin=TITLED_MARGIN, showlegend=False)
    return figure
