"""A Playground generation as one HTML file for people who will not run the app (issue #10, "Report for stakeholders").

The file has to open offline, from an e-mail attachment or a shared drive, years later: plotly.js is embedded inline
once, and there are no links to fonts, style sheets or CDNs. It is built from plain data (no Streamlit, no model), so
the page that offers the download stays a thin caller and the report can be tested on its own.
"""
from __future__ import annotations

import datetime
import html
import os
import platform

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .figures import TITLED_MARGIN
from .metrics import ppl_change
from .models import cpu_name

FIGURE_HEIGHT = "420px"  # a bare to_html div is sized 100% of a parent with no height; give each chart a real one

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2933;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d9dee3; padding-bottom: 0.2em; }
.muted { color: #66737f; font-size: 0.9em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #eef1f4; vertical-align: top; }
th { font-weight: 600; color: #4a5561; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #d9dee3; border-radius: 8px; padding: 0.6em 0.9em; min-width: 10em; flex: 1; }
.card .label { font-size: 0.85em; color: #4a5561; }
.card .value { font-size: 1.6em; font-weight: 600; }
.card .sub { font-size: 0.85em; color: #66737f; }
.sentence { font-size: 1.1em; }
.note { background: #fff4e5; border-left: 4px solid #f0a000; padding: 0.5em 0.8em; }
.texts { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.text { border: 1px solid #d9dee3; border-radius: 8px; padding: 0.6em 0.9em; white-space: pre-wrap; }
mark { background: #ffe08a; }
"""


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
    """The whole report as one self-contained HTML document (write it with encoding="utf-8").

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
    title = f"Sparsity lab report — {setting['model']} · {setting['spec']}"
    generated = machine.get("Generated")
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class='muted'>Generated {_esc(generated)}</p>" if generated else "",
            "<h2>Setting</h2>", _table(setting),
            "<h2>Headline</h2>", _headline(headline),
            "<h2>Generation</h2>", _texts(texts, divergence_chars)]
    if figures:
        body.append("<h2>Charts</h2>")
    for i, (chart_title, figure) in enumerate(figures.items()):
        height = f"{figure.layout.height}px" if figure.layout.height else FIGURE_HEIGHT  # its own, or it is clipped
        chart = figure.to_html(full_html=False, include_plotlyjs=i == 0, default_height=height)
        body.append(f"<section class='chart'><h3>{_esc(chart_title)}</h3>{chart}</section>")
    body += ["<h2>Beside llama.cpp</h2>", _peer(peer), "<h2>Machine</h2>", _table(machine)]
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body>\n</html>\n")


def _peer(result: dict | None) -> str:
    if result is None:
        return ("<p class='muted'>Not measured on this machine: run <code>make peer</code>, then "
                "<code>python -m sparse_core bench peer</code>.</p>")
    from . import peer
    frame = peer.table(result)
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(None if v != v else v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<p class='muted'>{_esc(peer.caption(result))}</p><table><tr>{head}</tr>{rows}</table>"


def _esc(value) -> str:
    """Every value shown is escaped: prompts and generated text are arbitrary and may contain markup."""
    return html.escape("—" if value is None else str(value))


def _table(rows: dict) -> str:
    """Keys become row labels ("max_new_tokens" -> "Max new tokens", "CPU cores" as it is); None shows as a dash."""
    labels = {key: key.replace("_", " ") for key in rows}
    cells = "".join(f"<tr><th>{_esc(labels[key][:1].upper() + labels[key][1:])}</th><td>{_esc(value)}</td></tr>"
                    for key, value in rows.items())
    return f"<table>{cells}</table>"


def _card(label: str, value: str, sub: str = "") -> str:
    sub_html = f"<div class='sub'>{_esc(sub)}</div>" if sub else ""
    return f"<div class='card'><div class='label'>{_esc(label)}</div><div class='value'>{_esc(value)}</div>{sub_html}</div>"


def _headline(h: dict) -> str:
    """The Playground's headline card, with the same formats, and a note in place of a speedup that is not a result."""
    flag, speedup = h.get("flag"), h.get("speedup")
    if flag:
        speed = _card("Decode speedup", "flagged", "not shown as a result")
        note = f"<p class='note'>The decode measurement of this setting is not shown as a result: {_esc(flag)}.</p>"
    elif speedup is None:
        speed = _card("Decode speedup", "not measured")
        note = "<p class='note'>Decode speed was not measured for this setting, so no speedup is claimed.</p>"
    else:
        iqr = h.get("speedup_iqr")
        speed = _card("Decode speedup", f"×{speedup:.2f}", f"IQR ×{iqr[0]:.2f}–×{iqr[1]:.2f}" if iqr else "")
        note = ""
    cards = [_card("Weight reads skipped", f"{h['weight_reads_skipped']:.1%}"), speed,
             _card("Speedup bound", f"×{h['bound']:.2f}", "1/(1−s): the most a memory-bound decoder can gain"),
             _card("Perplexity change", ppl_change(h["ppl_increase"]), f"{h['ppl_dense']:.1f} → {h['ppl_sparse']:.1f}"),
             _card("Top-1 agreement", f"{h['top1_agreement']:.0%}", f"KL {h['kl']:.3f} nats")]
    return (f"<div class='cards'>{''.join(cards)}</div>\n<p class='sentence'>{_esc(h['sentence'])}</p>{note}"
            f"<p class='muted'>Quality measured with {_esc(h['quality_protocol'])}.</p>")


def _texts(texts: dict[str, str], divergence_chars: int | None) -> str:
    sparse = texts["sparse"]
    if divergence_chars is None:
        marked = _esc(sparse)
        caption = "The sparse run produced the same text as dense."
    else:
        marked = f"{_esc(sparse[:divergence_chars])}<mark>{_esc(sparse[divergence_chars:])}</mark>"
        caption = ("The sparse text is highlighted from where it first differs from dense; after that the two continue "
                   "from different text, so later differences are expected.")
    return (f"<p><strong>Prompt</strong></p><div class='text'>{_esc(texts['prompt'])}</div>\n"
            f"<div class='texts'><div><p><strong>Dense</strong></p><div class='text'>{_esc(texts['dense'])}</div></div>"
            f"<div><p><strong>Sparse</strong></p><div class='text'>{marked}</div></div></div>\n"
            f"<p class='muted'>{_esc(caption)}</p>")
