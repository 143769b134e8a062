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
