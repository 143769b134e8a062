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

from .machine import cpu_name
from .views import ppl_change

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
