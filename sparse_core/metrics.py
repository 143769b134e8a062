"""What sparsity costs on a text: perplexity dense vs sparse, KL(dense || sparse), top-1 agreement, achieved sparsity.

Every surface (Playground, Quality, Tuner, `eval --json`, the README) shows one measurement per setting: the
default held-out text under the default protocol, kept on disk by `measured`. The protocol says which positions run
sparse and are scored. The default, "dense-prefill", is TEAL's rule and how the lab generates: each window's first
half is a dense context (the prompt's prefill), its second half runs sparse and is scored (the decode steps).
"all-sparse" sparsifies and scores every position, as the lab measured before generation kept its prefill dense.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

from .calibrate import Progress, default_text, text_hash, token_chunks
from .cost import token_cost
from .models import SparseModel
from .patch import sparsity
from .spec import SparsitySpec
from .store import DiskStore, digest, measurement_key
from .trace import SparsityCounter


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which positions of each `window`-token window run sparse and are scored, and the text's tokens read by default."""
    name: str
    window: int
    tokens: int
    dense_context: bool  # each window's first half runs dense, unscored; else every position is sparse and scored

    def text_tokens(self, max_tokens: int | None) -> int:
        """The text's tokens a measurement reads: `max_tokens`, or the protocol's own when None."""
        return self.tokens if max_tokens is None else max_tokens

    def context(self, window_tokens: int) -> int:
        """The dense, unscored tokens at the start of a window of this many tokens."""
        return window_tokens // 2 if self.dense_context else 0

    def describe(self, tokens: int) -> str:
        """The protocol in one phrase, as every surface labels a quality figure with it."""
        if self.dense_context:
            return (f"dense prefill, sparse decode: {tokens:,} held-out tokens in {self.window}-token windows, each "
                    "window's first half dense and its second half sparse and scored (TEAL's protocol)")
        return f"all positions sparse: {tokens:,} held-out tokens in {self.window}-token windows, every position scored"


PROTOCOLS = {"dense-prefill": Protocol("dense-prefill", 512, 2048, True),
             "all-sparse": Protocol("all-sparse", 256, 1024, False)}
DEFAULT_PROTOCOL = "dense-prefill"
QUALITY_TOKENS = PROTOCOLS[DEFAULT_PROTOCOL].tokens  # held-out tokens of the one quality measurement per setting
_MEASURED = DiskStore("quality", 1)


def protocol_of(name: str) -> Protocol:
    """The protocol called `name`, or a one-sentence error."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"Unknown quality protocol {name!r}; choose one of {', '.join(PROTOCOLS)}.") from None


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
    chunk_ppl_increase: list[float]  # sparse / dense perplexity - 1 in each window: the noise across the text
    protocol: str                # a key of PROTOCOLS: which positions ran sparse and were scored
    window: int                  # tokens per evaluation window
    held_out_tokens: int         # the text's tokens it read (QUALITY_TOKENS for the one measurement); `tokens` were scored

    @property
    def ppl_increase(self) -> float:
        return self.ppl_sparse / self.ppl_dense - 1.0

    @property
    def protocol_label(self) -> str:
        """How this figure was measured, in the words every surface shows beside it."""
        return PROTOCOLS[self.protocol].describe(self.held_out_tokens)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measured(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = None,
             progress: Progress | None = None, protocol: str = DEFAULT_PROTOCOL) -> Evaluation:
    """This setting's quality measurement under `protocol` (`max_tokens` None: the protocol's own): from disk when it
    was measured before on this machine, else evaluated (deterministic on the same weights, so the stored figure is
    the figure)."""
    known = stored(model, spec, text, max_tokens, protocol)
    if known is not None:
        return known
    result = evaluate(model, spec, text=text, max_tokens=max_tokens, progress=progress, protocol=protocol)
    _MEASURED.save(_key(model, spec, text, max_tokens, protocol), result.as_dict())
    return result


def stored(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = None,
           protocol: str = DEFAULT_PROTOCOL) -> Evaluation | None:
    """This setting's quality measurement if it was made before on this machine, without measuring."""
    try:
        return Evaluation(**(_MEASURED.load(_key(model, spec, text, max_tokens, protocol)) or {}))
    except TypeError:  # nothing stored (no fields), or written by an older version: measure again
        return None


def _key(model: SparseModel, spec: SparsitySpec, text: str | None, max_tokens: int | None, name: str) -> str:
    how = protocol_of(name)
    text = default_text("evaluation") if text is None else text
    return digest(measurement_key(model, spec), text_hash(text), how.text_tokens(max_tokens), how)


def evaluate(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = None,
             progress: Progress | None = None, protocol: str = DEFAULT_PROTOCOL) -> Evaluation:
    """Dense and sparse next-token predictions on the windows of `text` under `protocol`, compared where the sparse
    model made them: a dense-prefill window's second half continues (sparse, and dense for the reference) from the
    KV cache of its dense first half, as a generation's decode steps continue from its dense prefill."""
    model.check(spec)
    how = protocol_of(protocol)
    text = default_text("evaluation") if text is None else text
    windows = token_chunks(model, text, how.window, how.text_tokens(max_tokens))
    counter = SparsityCounter()
    nll_dense = nll_sparse = kl = agree = 0.0
    count, read, window_increase = 0, 0, []
    with torch.inference_mode():
        for done, ids in enumerate(windows, 1):
            read += ids.shape[1]
            context = how.context(ids.shape[1])
            dense, sparse = _predictions(model, spec, ids, context, counter)
            targets = ids[0, context + 1:]
            if len(targets):
                chunk_dense = float(F.nll_loss(dense, targets, reduction="sum"))
                chunk_sparse = float(F.nll_loss(sparse, targets, reduction="sum"))
                window_increase.append(math.exp((chunk_sparse - chunk_dense) / len(targets)) - 1.0)
                nll_dense += chunk_dense
                nll_sparse += chunk_sparse
                kl += float(F.kl_div(sparse, dense, log_target=True, reduction="sum"))
                agree += float((dense.argmax(-1) == sparse.argmax(-1)).sum())
                count += len(targets)
            if progress:
                progress(done, len(windows))
    if count == 0:
        raise ValueError("The text is too short to score any prediction; give a few sentences at least.")
    weights = model.skippable_params(spec.method)
    cost = token_cost(model, counter.weighted(weights))
    return Evaluation(math.exp(nll_dense / count), math.exp(nll_sparse / count), kl / count, agree / count,
                      counter.weighted(weights), counter.per_layer(weights), count, cost.reads_skipped, cost.bound,
                      window_increase, how.name, how.window, read)


def _predictions(model: SparseModel, spec: SparsitySpec, ids: torch.Tensor, context: int,
                 counter: SparsityCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense and sparse log-probabilities (float64) of the tokens after position `context` of one window: the whole
    window when `context` is 0, else its continuation from the dense KV cache of its first `context` tokens."""
    cache = None
    if context:
        with sparsity(None):
            cache = model.model(ids[:, :context], use_cache=True).cache
    scored = ids[:, context:]
    with sparsity(None):
        dense = model.model(scored, cache=copy.deepcopy(cache), use_cache=cache is not None).logits
    with sparsity(spec, [counter]):
        sparse = model.model(scored, cache=cache, use_cache=cache is not None).logits
    return (dense[0, :-1].double().log_softmax(-1), sparse[0, :-1].double().log_softmax(-1))
