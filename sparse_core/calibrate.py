"""Calibration: turn a target sparsity into thresholds by taking quantiles of the scores on calibration text.

One pass over the text fills an |x| histogram per (layer, group); any number of targets then costs no more model
time (the histograms are cached per model, method and text). Top-k needs no calibration: its spec is the target.
"""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from .models import SparseModel, cache_dir
from .patch import sparsity
from .spec import GROUPS, SparsitySpec, SpecError
from .trace import AbsHistogram

Progress = Callable[[int, int], None]  # (done, total)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def default_text(kind: str = "calibration") -> str:
    """The project's own texts: 'calibration' to fit thresholds, 'evaluation' (held out) to measure them."""
    return (ASSETS / f"{kind}.txt").read_text(encoding="utf-8")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def token_chunks(model: SparseModel, text: str, chunk_tokens: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    if not text or not text.strip():
        raise ValueError("The text is empty; give some text to calibrate or evaluate on.")
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    chunk_tokens = min(chunk_tokens, model.context_length)
    return [ids[i:i + chunk_tokens].unsqueeze(0).to(model.device) for i in range(0, len(ids), chunk_tokens) if len(ids[i:i + chunk_tokens]) > 1]


_HISTOGRAMS: dict[tuple[str, str, str], AbsHistogram] = {}


def score_histograms(model: SparseModel, method: str, text: str | None = None, chunk_tokens: int = 512,
                     progress: Progress | None = None) -> AbsHistogram:
    """Histograms of the scores each method thresholds, gathered on the dense model over `text`.

    TEAL scores |x| of every projection input; CATS scores |act(gate(x))|, which a CATS spec with zero thresholds
    exposes while computing exactly the dense output.
    """
    text = default_text("calibration") if text is None else text
    key = (model.fingerprint, "cats" if method == "cats" else "teal", text_hash(text))
    if key in _HISTOGRAMS:
        return _HISTOGRAMS[key]
    observing = SparsitySpec.from_tables("cats", model.dense_spec().values, model.fingerprint) if method == "cats" else None
    histogram = AbsHistogram(("mlp_mid",) if method == "cats" else GROUPS)
    chunks = token_chunks(model, text, chunk_tokens)
    with torch.inference_mode():
        for done, ids in enumerate(chunks, 1):
            with sparsity(observing, [histogram]):
                model.model(ids, use_cache=False)
            if progress:
                progress(done, len(chunks))
    _HISTOGRAMS[key] = histogram
    return histogram


def calibrate(model: SparseModel, method: str, target: float | Sequence[Sequence[float]], text: str | None = None,
              progress: Progress | None = None) -> SparsitySpec:
    """A spec whose thresholds skip `target` of each (layer, group)'s inputs on the calibration text.

    `target` is one model-wide number (uniform) or a [layer][group] table. For CATS only the mlp_mid column counts.
    """
    table = _target_table(model, target)
    if method == "cats" and not model.gated:
        model.check(SparsitySpec.from_tables("cats", table, model.fingerprint))
    text = default_text("calibration") if text is None else text
    provenance = dict(model=model.name, allocation="uniform" if isinstance(target, (int, float)) else "per-layer",
                      calibration_text=text_hash(text), created=datetime.date.today().isoformat())
    if method == "dense":
        return model.dense_spec()
    if method == "topk":
        return SparsitySpec.from_tables("topk", table, model.fingerprint, targets=table, **provenance)
    if method not in ("teal", "cats"):
        raise SpecError(f"Unknown sparsity method {method!r}; choose one of teal, cats, topk, dense.")
    if method == "cats":
        table = [[0.0, 0.0, 0.0, row[GROUPS.index("mlp_mid")]] for row in table]
    histogram = score_histograms(model, method, text, progress=progress)
    values = [[histogram.quantile(layer, group, t) if group in histogram.groups else 0.0
               for group, t in zip(GROUPS, row)] for layer, row in enumerate(table)]
    return SparsitySpec.from_tables(method, values, model.fingerprint, targets=table, **provenance)


def _target_table(model: SparseModel, target: float | Sequence[Sequence[float]]) -> list[list[float]]:
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        if not 0.0 <= float(target) <= 1.0:
            raise SpecError(f"The target sparsity {target} must lie between 0 and 1.")
        return [[float(target)] * len(GROUPS) for _ in range(model.num_layers)]
    table = [list(map(float, row)) for row in target]
    SparsitySpec.from_tables("topk", table, model.fingerprint).check_model(model.fingerprint, model.num_layers)
    return table
