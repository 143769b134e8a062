"""The Playground's live view of a side-by-side generation (lab.Lab.compare): the layer x token heatmap that grows one
column per generated token, and the strip of running rates beside it. Not registered in app.py's navigation."""
from __future__ import annotations

import time

import streamlit as st

from sparse_core import figures

# The live heatmap redraws at most this often, between forward passes, never inside one: each redraw costs decode
# speed when the browser shares the server's cores (docs/PERFORMANCE.md, "Design decisions", has the measurement).
DRAW_EVERY_S = 0.5


class LiveView:
    """The heatmap and the strip of running numbers of a comparison (comparison.Comparison); drawn while tokens
    stream (when on) and once at the end."""

    def __init__(self):
        left, right = st.columns([4, 1])
        self.chart = left.empty()
        with right:
            self.metrics = {name: st.empty() for name in ("dense", "sparse", "speedup", "bound")}
        self.drawn_at = 0.0

    def update(self, result, final: bool = False) -> None:
        """Strip every call; heatmap at most every DRAW_EVERY_S, and always on the final call."""
        self.strip(result)
        if final or time.monotonic() - self.drawn_at >= DRAW_EVERY_S:
            self.heatmap(result)
            self.drawn_at = time.monotonic()

    def strip(self, result) -> None:
        rates = result.rates
        steps = f" over {rates.steps} equal steps" if rates else ""
        self.metrics["dense"].metric("Dense tok/s", f"{rates.dense:.1f}" if rates else "—", help=f"1 / median step time{steps}.")
        self.metrics["sparse"].metric("Sparse tok/s", f"{rates.sparse:.1f}" if rates else "—", help=f"1 / median step time{steps}.")
        if rates and not result.flag:
            self.metrics["speedup"].metric("Running speedup", f"×{rates.speedup:.2f}", help=f"Sparse over dense{steps}.")
        else:
            self.metrics["speedup"].metric("Running speedup", "—", help=f"Flagged: {result.flag}." if rates else None)
        self.metrics["bound"].metric("Bound so far", f"×{result.cost.bound:.2f}",
                                     help="1/(1−s) for the share s of weight reads this run has skipped so far.")

    def heatmap(self, result) -> None:
        tokens = result.decoded_texts()
        figure = figures.live_heatmaps(result.skipped_per_token(), tokens)
        figure.update_layout(title=dict(text=f"Skipped in each decode step · {result.name}", font=dict(size=14),
                                        x=0, xanchor="left"))
        self.chart.plotly_chart(figure, width="stretch", key=f"live-{len(tokens)}-{time.monotonic_ns()}")
