"""What sparsity costs on a text: perplexity dense vs sparse, KL(dense || sparse), top-1 agreement, achieved sparsity.

Every surface (Playground, Quality, Tuner, `eval --json`, the README) shows one measurement per setting: the
default held-out text, its first QUALITY_TOKENS tokens in CHUNK_TOKENS-token chunks, kept on disk by `measured`.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .calibrate import Progress, default_text, text_hash, token_chunks
from .cost import token_cost
from .models import SparseModel
from .patch import sparsity
from .spec import SparsitySpec
from .store import DiskStore, digest, setting_key
from .trace import SparsityCounter

QUALITY_TOKENS = 1024  # held-out tokens of the one quality measurement per setting
CHUNK_TOKENS = 256     # context of each evaluated chunk; four chunks give the spread across the text
_MEASURED = DiskStore("quality")


@dataclasses.dataclass
class Evaluation:
    ppl_dense: float
    ppl_sparse: float
    kl: float                    # mean over predicted tokens of KL(dense || sparse), nats
    top1_agreement: float        # fraction of positions where both argmax tokens agree
    achieved_sparsity: float     # fraction of sparsifiable weight reads skipped, groups weighted by size
    per_layer_sparsity: list[float]
    tokens: int
    weight_reads_skipped: float  # share of all weight bytes read per token that were skipped (the bound's s)
    bound: float                 # 1 / (1 - weight_reads_skipped)
    chunk_ppl_increase: list[float]  # sparse / dense perplexity - 1 in each chunk: the noise across the text

    @property
    def ppl_increase(self) -> float:
        return self.ppl_sparse / self.ppl_dense - 1.0

    @property
    def held_out_tokens(self) -> int:
        """The text's tokens it read (QUALITY_TOKENS for the one measurement): each chunk predicts all but its first,
        so `tokens` is one per chunk fewer. Every surface names this figure."""
        return self.tokens + len(self.chunk_ppl_increase)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def ppl_change(increase: float) -> str:
    """A perplexity change as people read it, on every surface: a percentage up to doubling, a factor beyond
    (×301, not +29953.3 %)."""
    ratio = increase + 1
    return f"{increase:+.1%}" if increase < 1.0 else f"×{ratio:.3g}" if ratio < 1000 else f"×{ratio:,.0f}"


def measured(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int = QUALITY_TOKENS,
             progress: Progress | None = None) -> Evaluation:
    """This setting's quality measurement: from disk when it was measured before on this machine, else evaluated
    (deterministic on the same weights, so the stored figure is the figure)."""
    known = stored(model, spec, text, max_tokens)
    if known is not None:
        return known
    result = evaluate(model, spec, text=text, max_tokens=max_tokens, progress=progress)
    _MEASURED.save(_key(model, spec, text, max_tokens), result.as_dict())
    return result


def stored(model: SparseModel, spec: SparsitySpec, text: str | None = None,
           max_tokens: int = QUALITY_TOKENS) -> Evaluation | None:
    """This setting's quality measurement if it was made before on this machine, without measuring."""
    try:
        return Evaluation(**(_MEASURED.load(_key(model, spec, text, max_tokens)) or {}))
    except TypeError:  # nothing stored (no fields), or written by an older version: measure again
        return None


def _key(model: SparseModel, spec: SparsitySpec, text: str | None, max_tokens: int) -> str:
    text = default_text("evaluation") if text is None else text
    return digest(setting_key(model, spec), text_hash(text), max_tokens, CHUNK_TOKENS)


def evaluate(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = QUALITY_TOKENS,
             chunk_tokens: int = CHUNK_TOKENS, progress: Progress | None = None) -> Evaluation:
    model.check(spec)
    chunks = token_chunks(model, default_text("evaluation") if text is None else text, chunk_tokens, max_tokens)
    counter = SparsityCounter()
    nll_dense = nll_sparse = kl = agree = 0.0
    count, chunk_increase = 0, []
    with torch.inference_mode():
        for done, ids in enumerate(chunks, 1):
            with sparsity(None):
                dense = model.model(ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            with sparsity(spec, [counter]):
                sparse = model.model(ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            chunk_dense = float(F.nll_loss(dense, targets, reduction="sum"))
            chunk_sparse = float(F.nll_loss(sparse, targets, reduction="sum"))
            chunk_increase.append(math.exp((chunk_sparse - chunk_dense) / len(targets)) - 1.0)
            nll_dense += chunk_dense
            nll_sparse += chunk_sparse
            kl += float(F.kl_div(sparse, dense, log_target=True, reduction="sum"))
            agree += float((dense.argmax(-1) == sparse.argmax(-1)).sum())
            count += len(targets)
            if progress:
                progress(done, len(chunks))
    weights = model.skippable_params(spec.method)
    cost = token_cost(model, counter.weighted(weights))
    return Evaluation(math.exp(nll_dense / count), math.exp(nll_sparse / count), kl / count, agree / count,
                      counter.weighted(weights), counter.per_layer(weights), count, cost.reads_skipped, cost.bound,
                      chunk_increase)
