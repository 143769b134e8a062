"""A prompt's prefill in passes of PREFILL_CHUNK tokens, each continuing the KV cache the last one filled: a long
prompt's prefill reports its progress between passes, and attention's scores over the cache stay small (one pass
over 5,000 tokens would hold gigabytes of them). Every method decides per token, so the chunks change nothing."""
from __future__ import annotations

from typing import Callable

import torch

PREFILL_CHUNK = 512
Progress = Callable[[int, int], None]


def chunked(ids: list[int], forward: Callable[[list[int]], torch.Tensor], progress: Progress | None) -> torch.Tensor:
    """`forward` over `ids` a chunk at a time, `progress(tokens read, total)` after each: the last pass's logits."""
    logits = None
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = forward(ids[start:start + PREFILL_CHUNK])
        if progress:
            progress(min(start + PREFILL_CHUNK, len(ids)), len(ids))
    return logits
