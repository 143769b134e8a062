"""A Playground generation as the page keeps it, and its live view: the layer x token heatmap that grows one column
per generated token, and the strip of running rates beside it. Not registered in app.py's navigation."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import streamlit as st

from pages import common
from sparse_core import bench, cost, fast_decode, figures, generate, metrics, models, peer, stakeholder_report, views
from sparse_core.spec import GROUPS, SparsitySpec
from sparse_core.trace import SparsityCounter

RUNS = ("dense", "sparse")
# The live heatmap redraws at most this often, between forward passes, never inside one: each redraw costs decode
# speed when the browser shares the server's cores (docs/PERFORMANCE.md, "Design decisions", has the measurement).
DRAW_EVERY_S = 0.5


@dataclasses.dataclass
class Result:
    """One Generate click: both runs' tokens, what the sparse run skipped and the setting that produced them.
    Saved after every token, so a run the visitor stops (or interrupts with another click) keeps what it made,
    marked partial."""
    model: models.SparseModel
    prompt: generate.Prompt
    prompt_text: str  # what the visitor typed (the prompt's ids carry the chat template too)
    tokens: dict[str, list[generate.Token]]
    spec: SparsitySpec
    method: str
    name: str      # Selection.name at generation time
    label: str     # Selection.label at generation time: what was asked for
    counter: SparsityCounter  # the sparse run's
    compiled: bool = False    # the compiled step was asked for
    sparse_prefill: bool = False  # the spec applied to the prompt's prefill too (never counted: decode steps only)
    partial: bool = True
    stage: str = "compiling"  # then "streaming", then "done"
    report: str | None = None  # the stakeholder report of the finished (or stopped) result, built once
    notes: list[str] = dataclasses.field(default_factory=list)  # why a run decoded uncompiled (one sentence each)

    def text(self, run: str) -> str:
        return "".join(t.text for t in self.tokens[run])

    @property
    def ran_compiled(self) -> bool:
        """Every decode step of both runs ran the compiled step (the prefill passes are eager by design)."""
        steps = [t for run in RUNS for t in self.tokens[run][1:]]
        return self.compiled and all(t.compiled for t in steps)

    @property
    def produced_by(self) -> str:
        """The setting as it ran: "· compiled" only where every decode step ran compiled."""
        asked = self.label.removesuffix(" · compiled")
        return asked + (" · compiled" if self.ran_compiled else " · uncompiled" if self.compiled else "")

    @property
    def rates(self) -> bench.PairedRates | None:
        return bench.paired_rates(self.tokens["dense"], self.tokens["sparse"])

    @property
    def flag(self) -> str | None:
        """Why this generation's speed ratio must not be presented (above its bound, or too noisy), if it must not."""
        rates = self.rates
        return None if rates is None else rates.flag(self.cost.bound)

    @property
    def divergence(self) -> int | None:
        return generate.first_divergence(self.tokens["dense"], self.tokens["sparse"])

    @property
    def achieved(self) -> float:
        """Share of the sparsifiable weight reads the sparse run skipped."""
        return self.counter.weighted(self.model.skippable_params(self.method))

    @property
    def cost(self) -> cost.TokenCost:
        return cost.token_cost(self.model, self.achieved)

    @property
    def per_layer(self) -> pd.DataFrame:
        return views.per_layer_frame(self.model, self.counter, self.method)

    def skipped_per_token(self) -> dict[str, np.ndarray]:
        """Per group, layers x decode steps: the share skipped in the step that produced each token after the first
        (the prompt's prefill, which produces the first, is not counted)."""
        return {g: np.asarray(self.counter.pass_matrix(g, self.model.num_layers), dtype=float) for g in GROUPS}

    def decoded_texts(self) -> list[str]:
        """The texts of the sparse run's tokens made by decode steps: the heatmap's columns."""
        return [t.text for t in self.tokens["sparse"][1:]]


class LiveView:
    """The heatmap and the strip of running numbers; drawn while tokens stream (when on) and once at the end."""

    def __init__(self):
        left, right = st.columns([4, 1])
        self.chart = left.empty()
        with right:
            self.metrics = {name: st.empty() for name in ("dense", "sparse", "speedup", "bound")}
        self.drawn_at = 0.0

    def update(self, result: Result, final: bool = False) -> None:
        """Strip every call; heatmap at most every DRAW_EVERY_S, and always on the final call."""
        self.strip(result)
        if final or time.monotonic() - self.drawn_at >= DRAW_EVERY_S:
            self.heatmap(result)
            self.drawn_at = time.monotonic()

    def strip(self, result: Result) -> None:
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

    def heatmap(self, result: Result) -> None:
        tokens = result.decoded_texts()
        figure = figures.live_heatmaps(result.skipped_per_token(), tokens)
        figure.update_layout(title=dict(text=f"Skipped in each decode step · {result.name}", font=dict(size=14),
                                        x=0, xanchor="left"))
        self.chart.plotly_chart(figure, width="stretch", key=f"live-{len(tokens)}-{time.monotonic_ns()}")


def report_html(result: Result) -> str:
    """The stakeholder report of a generation: the setting's headline numbers (its stored quality and valid speed
    measurements, the same the headline card shows), both texts, the live heatmap's final state, the speed and quality
    charts with the bound, llama.cpp's rates beside the lab's (bench peer), and the machine."""
    model, spec = result.model, result.spec
    quality = metrics.measured(model, spec)
    speed = bench.stored_decode(model, spec, result.compiled)
    flagged = bench.flagged_decode(model, spec, result.compiled)
    setting = dict(model=model.name, method=result.method, spec=result.name, target=_uniform_target(spec),
                   dtype=str(model.dtype).replace("torch.", ""), layout=model.layout, device=model.device.type,
                   decoder=(fast_decode.step_name(model, spec) if result.ran_compiled else "uncompiled step"
                            if result.compiled else "HF forward"),
                   generation=(f"Partial result: stopped after {len(result.tokens['sparse'])} sparse and "
                               f"{len(result.tokens['dense'])} dense tokens" if result.partial else "complete"))
    headline = dict(weight_reads_skipped=quality.weight_reads_skipped, bound=quality.bound, ppl_dense=quality.ppl_dense,
                    ppl_sparse=quality.ppl_sparse, ppl_increase=quality.ppl_increase,
                    top1_agreement=quality.top1_agreement, kl=quality.kl, quality_protocol=quality.protocol_label,
                    flag=flagged["flag"] if flagged and not speed else None,
                    speedup=speed["speedup"] if speed else None, speedup_iqr=speed["speedup_iqr"] if speed else None,
                    sentence=common.headline_sentence(quality, speed))
    divergence = result.divergence
    divergence_chars = None if divergence is None else len("".join(t.text for t in result.tokens["sparse"][:divergence]))
    heatmap = figures.live_heatmaps(result.skipped_per_token(), result.decoded_texts())
    charts = {f"Skipped share per layer and decode step ({result.name})": heatmap}
    if speed:
        charts[f"Decode speed against the bound ({speed['new_tokens']} steps × {speed['repeats']} runs, "
               f"dense path “{speed['dense_path']}”)"] = stakeholder_report.speed_figure(
            speed["dense_tok_s"], speed["sparse_tok_s"], speed["bound"], speed["speedup"],
            stakeholder_report.bandwidth_limits(speed))
    elif result.rates is not None:
        rates = result.rates
        charts[f"This generation's rates against the bound ({rates.steps} equal steps; not the setting's "
               f"decode measurement)"] = stakeholder_report.speed_figure(rates.dense, rates.sparse, result.cost.bound)
    charts[f"Quality: {quality.protocol_label}"] = stakeholder_report.quality_figure(
        quality.ppl_dense, quality.ppl_sparse, quality.top1_agreement)
    texts = {"prompt": result.prompt_text, "dense": result.text("dense"), "sparse": result.text("sparse")}
    return stakeholder_report.build(setting, headline, texts, divergence_chars, charts,
                                    peer=peer.stored(model.device.type))


def _uniform_target(spec: SparsitySpec) -> float | None:
    targets = {t for row in (spec.targets or ()) for t in row if t > 0}
    return targets.pop() if len(targets) == 1 else None
