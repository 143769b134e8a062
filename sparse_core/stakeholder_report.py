"""A Playground generation as one HTML file for people who will not run the app (issue #10, "Report for stakeholders").

The file has to open offline, from an e-mail attachment or a shared drive, years later: plotly.js is embedded inline
once, and there are no links to fonts, style sheets or CDNs. It is built from plain data (no Streamlit, no model), so
the page that offers the download stays a thin caller and the report can be tested on its own.
"""
from __future__ import annotations

import datetime
import os
import platform

import jinja2
import plotly.graph_objects as go
import torch
from markupsafe import Markup
from plotly.subplots import make_subplots

from .figures import TITLED_MARGIN
from .machine import cpu_name
from .metrics import ppl_change

FIGURE_HEIGHT = "420px"  # a bare to_html div is sized 100% of a parent with no height; give each chart a real one


def machine_info() -> dict[str, str]:
    """Where the report was made: a speed figure means little without the hardware and software behind it."""
    cpu = cpu_name()
    return {
        "Platform": platform.platform(),
        "Python": platform.python_version(),
        "PyTorch": torch.__version__,
        "CPU": cpu if cpu != "cpu" else platform.processor() or platform.machine(),
        "CPU cores": str(os.cpu_count()),
        "Torch threads": str(torch.get_num_threads()),
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "Generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


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


def build(setting: dict, headline: dict, texts: dict[str, str], divergence_chars: int | None,
          figures: dict[str, go.Figure], machine: dict | None = None, peer: dict | None = None) -> str:
    """The whole report as one self-contained HTML document (write it with encoding="utf-8"), rendered from
    templates/report.html with every value escaped.

    setting: model, method, spec (its name), target (or None), dtype, layout, device, decoder; shown as a table in
    this order.
    headline: weight_reads_skipped (0..1), speedup (None when not measured), speedup_iqr ([lo, hi] or None), bound,
        ppl_dense, ppl_sparse, ppl_increase, top1_agreement, kl, quality_protocol (how the quality figures were
        measured, metrics.Evaluation.protocol_label), flag (None, or why the speed measurement is not valid: a
        flagged speedup is never shown, only the flag), and `sentence`, the one-line summary.
    texts: "prompt", "dense", "sparse". divergence_chars: where in texts["sparse"] the sparse text first differs from
        dense (None when identical); the rest of the sparse text is marked.
    figures: charts by title, embedded in this order (plotly.js goes inline with the first one only).
    machine: the machine table; machine_info() when not given.
    peer: this machine's stored `bench peer` result (peer.stored()), shown beside the lab's rates; None: none yet.
    """
    machine = machine_info() if machine is None else machine
    charts = []
    for i, (chart_title, figure) in enumerate(figures.items()):
        height = f"{figure.layout.height}px" if figure.layout.height else FIGURE_HEIGHT  # its own, or it is clipped
        charts.append((chart_title, Markup(figure.to_html(full_html=False, include_plotlyjs=i == 0,
                                                          default_height=height))))
    return _TEMPLATE.render(
        title=f"Sparsity lab report — {setting['model']} · {setting['spec']}", generated=machine.get("Generated"),
        setting=_rows(setting), cards=_cards(headline), sentence=headline["sentence"], note=_note(headline),
        quality_protocol=headline["quality_protocol"], texts=texts, divergence_chars=divergence_chars, charts=charts,
        peer=_peer(peer), machine=_rows(machine))


_TEMPLATE = jinja2.Environment(loader=jinja2.PackageLoader("sparse_core", "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_TEMPLATE.filters["dash"] = lambda value: "—" if value is None or value != value else value  # None, NaN: a dash
_TEMPLATE = _TEMPLATE.get_template("report.html")


def _peer(result: dict | None) -> dict | None:
    if result is None:
        return None
    from . import peer
    frame = peer.table(result)
    return dict(caption=peer.caption(result), columns=list(frame.columns), rows=list(frame.itertuples(index=False)))


def _rows(rows: dict) -> list[tuple[str, object]]:
    """Keys become row labels ("max_new_tokens" -> "Max new tokens", "CPU cores" as it is)."""
    return [(key.replace("_", " ")[:1].upper() + key.replace("_", " ")[1:], value) for key, value in rows.items()]


def _cards(h: dict) -> list[tuple[str, str, str]]:
    """The Playground's headline card, with the same formats; a speedup that is not a result is never shown."""
    flag, speedup, iqr = h.get("flag"), h.get("speedup"), h.get("speedup_iqr")
    if flag:
        speed = ("Decode speedup", "flagged", "not shown as a result")
    elif speedup is None:
        speed = ("Decode speedup", "not measured", "")
    else:
        speed = ("Decode speedup", f"×{speedup:.2f}", f"IQR ×{iqr[0]:.2f}–×{iqr[1]:.2f}" if iqr else "")
    return [("Weight reads skipped", f"{h['weight_reads_skipped']:.1%}", ""), speed,
            ("Speedup bound", f"×{h['bound']:.2f}", "1/(1−s): the most a memory-bound decoder can gain"),
            ("Perplexity change", ppl_change(h["ppl_increase"]), f"{h['ppl_dense']:.1f} → {h['ppl_sparse']:.1f}"),
            ("Top-1 agreement", f"{h['top1_agreement']:.0%}", f"KL {h['kl']:.3f} nats")]


def _note(h: dict) -> str | None:
    if h.get("flag"):
        return f"The decode measurement of this setting is not shown as a result: {h['flag']}."
    if h.get("speedup") is None:
        return "Decode speed was not measured for this setting, so no speedup is claimed."
    return None
