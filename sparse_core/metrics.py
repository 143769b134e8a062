"""What sparsity costs on a text: perplexity dense vs sparse, KL(dense || sparse), top-1 agreement, achieved sparsity."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .calibrate import Progress, default_text, token_chunks
from .models import SparseModel
from .patch import sparsity
from .spec import SparsitySpec
from .trace import SparsityCounter


@dataclasses.dataclass
class Evaluation:
    ppl_dense: float
    ppl_sparse: float
    kl: float                    # mean over predicted tokens of KL(dense || sparse), nats
    top1_agreement: float        # fraction of positions where both argmax tokens agree
    achieved_sparsity: float     # fraction of sparsifiable weight reads skipped, groups weighted by size
    per_layer_sparsity: list[float]
    tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model: SparseModel, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = 2048,
             chunk_tokens: int = 512, progress: Progress | None = None) -> Evaluation:
    model.check(spec)
    chunks = token_chunks(model, default_text("evaluation") if text is None else text, chunk_tokens, max_tokens)
    counter = SparsityCounter()
    nll_dense = nll_sparse = kl = agree = 0.0
    count = 0
    with torch.inference_mode():
        for done, ids in enumerate(chunks, 1):
            with sparsity(None):
                dense = model.model(ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            with sparsity(spec, [counter]):
                sparse = model.model(ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            nll_dense += float(F.nll_loss(dense, targets, reduction="sum"))
            nll_sparse += float(F.nll_loss(sparse, targets, reduction="sum"))
            kl += float(F.kl_div(sparse, dense, log_target=True, reduction="sum"))
            agree += float((dense.argmax(-1) == sparse.argmax(-1)).sum())
            count += len(targets)
            if progress:
                progress(done, len(chunks))
    weights = model.skippable_params(spec.method)
    return Evaluation(math.exp(nll_dense / count), math.exp(nll_sparse / count), kl / count, agree / count,
                      counter.weighted(weights), counter.per_layer(weights), count)
