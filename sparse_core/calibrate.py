"""Calibration: turn a target sparsity into thresholds by taking quantiles of the scores on calibration text.

A pass over the text fills an |x| histogram per (layer, group); quantiles of it are the thresholds. Histograms
are cached per model, method, text and the spec running during the pass. Top-k needs no calibration: its spec is the target.
"""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from .models import SparseModel
from .patch import sparsity
from .spec import GROUPS, SparsitySpec, SpecError
from .store import BoundedCache, DiskStore, digest, write_atomically
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


_HISTOGRAMS = BoundedCache(32)  # a few MB each
# Tokens of the calibration text a pass reads: ~1-3 million scores per (layer, group), ample for a quantile, and
# half the prefill compute of the whole text (a pass is compute-bound: ~4 s here instead of ~8 s, cold start).
CALIBRATION_TOKENS = 2048


def score_histograms(model: SparseModel, method: str, text: str, running: SparsitySpec | None = None,
                     chunk_tokens: int = 512, progress: Progress | None = None) -> AbsHistogram:
    """Histograms of the scores a method thresholds, over `text`, with `running` applied (None = dense).

    TEAL scores |x| of every projection input; CATS scores |act(gate(x))|, which a CATS spec exposes (with zero
    thresholds it computes exactly the dense output). Cached per model, text and running spec.
    """
    if running is None and method == "cats":
        running = SparsitySpec.from_tables("cats", model.dense_spec().values, model.fingerprint)
    key = (model.fingerprint, "cats" if method == "cats" else "teal", text_hash(text), running and running.values)
    cached = _HISTOGRAMS.get(key)
    if cached is not None:
        return cached
    histogram = AbsHistogram(("mlp_mid",) if method == "cats" else GROUPS)
    chunks = token_chunks(model, text, chunk_tokens, CALIBRATION_TOKENS)
    with torch.inference_mode():
        for done, ids in enumerate(chunks, 1):
            with sparsity(running, [histogram]):
                model.model(ids, use_cache=False)
            if progress:
                progress(done, len(chunks))
    return _HISTOGRAMS.put(key, histogram)


def calibrate(model: SparseModel, method: str, target: float | Sequence[Sequence[float]], text: str | None = None,
              progress: Progress | None = None, refine: int = 1) -> SparsitySpec:
    """A spec whose thresholds skip `target` of each (layer, group)'s inputs on the calibration text.

    `target` is one model-wide number (uniform) or a [layer][group] table; for CATS only the mlp_mid column counts.
    The first pass reads dense activations; sparsity upstream shrinks the activations a layer sees, so each of
    `refine` further passes re-reads them with the previous thresholds applied (measured on SmolLM2 at 50 %:
    dense-only calibration overshoots by 2-4 points on held-out text; one refinement pass removes most of it).
    """
    table = _target_table(model, target)
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
        model.check(SparsitySpec.from_tables("cats", table, model.fingerprint))
        table = [[0.0, 0.0, 0.0, row[GROUPS.index("mlp_mid")]] for row in table]
    cached = calibration_cache_path(model, method, table, text, refine)
    try:  # a corrupt or foreign cache file is ignored and rebuilt, never trusted
        spec = SparsitySpec.from_json(cached.read_text(encoding="utf-8"))
        model.check(spec)
        return spec
    except (OSError, SpecError):
        spec = None
    for step in range(1 + refine):
        report = (lambda done, total, step=step: progress(step * total + done, (1 + refine) * total)) if progress else None
        histogram = score_histograms(model, method, text, spec, progress=report)
        values = [[histogram.quantile(layer, group, t) if group in histogram.groups else 0.0
                   for group, t in zip(GROUPS, row)] for layer, row in enumerate(table)]
        spec = SparsitySpec.from_tables(method, values, model.fingerprint, targets=table, **provenance)
    write_atomically(cached, spec.to_json())
    return spec


_CALIBRATIONS = DiskStore("calibrations", 3)  # v3: thresholds from the first 2,048 calibration tokens


def calibration_cache_path(model: SparseModel, method: str, table: list[list[float]], text: str, refine: int) -> Path:
    return _CALIBRATIONS.path(digest(model.fingerprint, method, table, text_hash(text), refine))


def _target_table(model: SparseModel, target: float | Sequence[Sequence[float]]) -> list[list[float]]:
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        if not 0.0 <= float(target) <= 1.0:
            raise SpecError(f"The target sparsity {target} must lie between 0 and 1.")
        return [[float(target)] * len(GROUPS) for _ in range(model.num_layers)]
    table = [list(map(float, row)) for row in target]
    SparsitySpec.from_tables("topk", table, model.fingerprint).check_model(model.fingerprint, model.num_layers)
    return table
