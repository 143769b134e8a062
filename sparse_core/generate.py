"""Streaming generation, dense or with a spec: greedy or seeded sampling, one token at a time with its wall time."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from . import fast_decode
from .models import SparseModel
from .patch import Observer, sparsity
from .prefill import Progress, chunked
from .spec import SparsitySpec

MAX_NEW_TOKENS = 4096


class GenerationError(ValueError):
    """A generation request that cannot run as asked; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    truncated: int  # how many tokens were cut from the front to fit the context


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    text: str        # the new text this token adds (may be empty mid-way through a multi-byte character)
    seconds: float   # wall time of the forward pass that produced it
    compiled: bool = False   # the stream decodes with the compiled step (fast_decode) at this token (prefill: eager)
    note: str | None = None  # set on the token where a compiled stream fell back to eager decoding: why


def encode_prompt(model: SparseModel, prompt: str, chat: bool = True, max_new_tokens: int = 0) -> Prompt:
    """Tokenise, through the chat template when the model has one; keep the end if it is too long."""
    if not prompt or not prompt.strip():
        raise GenerationError("The prompt is empty; type something for the model to continue.")
    tokenizer = model.tokenizer
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    room = max(1, model.context_length - max_new_tokens)
    return Prompt(tuple(ids[-room:]), max(0, len(ids) - room))


def greedy(logits: torch.Tensor) -> int:
    """The index of the largest logit (the first of equals, as torch.argmax picks). On the CPU through NumPy, whose
    argmax over a vocabulary costs a fraction of torch's: a cost every greedy token pays."""
    return int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())


def stream(model: SparseModel, prompt: Prompt, spec: SparsitySpec | None = None, max_new_tokens: int = 64,
           temperature: float = 0.0, seed: int = 0, observers: tuple[Observer, ...] = (),
           stop_at_eos: bool = True, dense_route: str | None = None, compiled: bool = False,
           sparse_prefill: bool = False, on_prefill: Progress | None = None) -> Iterator[Token]:
    """Yield generated tokens. The spec applies to the decode steps; the prompt's prefill runs dense (it is
    compute-bound, so skipping buys nothing there, and a thresholded prompt's KV cache costs every later token
    quality) unless `sparse_prefill`. Observers see the decode steps only, in both cases: what they count is what a
    generated token skips. The spec is set only around each forward pass, never across a yield. `dense_route`
    overrides how dense products are computed (benchmarks time both routes; see patch.DENSE_ROUTES). `compiled`
    decodes with the compiled step of fast_decode where the model supports it (the prompt's prefill runs there
    eagerly); observers that need every score keep HF's forward (fast_decode.observable says which do not). Each
    token says whether its pass ran compiled, and the one where the stream fell back to eager decoding says why.
    `on_prefill(done, total)` hears the prompt's tokens read so far after each pass (prefill.PREFILL_CHUNK)."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}.")
    if temperature < 0 or temperature != temperature:
        raise GenerationError(f"temperature must be 0 (greedy) or positive, got {temperature}.")
    model.check(spec)
    generator = torch.Generator().manual_seed(seed)
    eos = eos_ids(model)
    fast = fast_decode.covering(model, spec, dense_route) if compiled and fast_decode.observable(observers) else None
    session = (fast_decode.Session(fast, spec, len(prompt.ids) + max_new_tokens, True, dense_route, observers,
                                   sparse_prefill) if fast else HFSession(model, spec, observers, dense_route, sparse_prefill))
    produced, text_so_far, noted = [], "", None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            logits = (session.step(produced[-1]) if produced else session.prefill(list(prompt.ids), on_prefill)).float()
            note, noted = (session.note if session.note != noted else None), session.note
            if temperature > 0:
                probs = (logits / temperature).softmax(-1).cpu()
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            else:
                next_id = greedy(logits)
            seconds = time.perf_counter() - start
            produced.append(next_id)
            text = model.tokenizer.decode(produced, skip_special_tokens=True)
            delta, text_so_far = text[len(text_so_far):], text
            yield Token(next_id, delta, seconds, session.compiled, note)
            if stop_at_eos and next_id in eos:
                return


class HFSession:
    """One generation through the patched model's HF forward and its cache, as fast_decode.Session is one through
    the compiled step: the prompt's prefill dense unless `sparse_prefill`, each decode step with the spec, seen by
    the observers."""
    compiled = False
    note = None  # nothing to fall back from

    def __init__(self, model: SparseModel, spec: SparsitySpec | None, observers: tuple[Observer, ...] = (),
                 dense_route: str | None = None, sparse_prefill: bool = False):
        self.model, self.spec, self.observers, self.dense_route = model, spec, tuple(observers), dense_route
        self.sparse_prefill = sparse_prefill
        self.cache = None  # HF's cache of every position so far

    def prefill(self, ids: list[int], progress: Progress | None = None) -> torch.Tensor:
        """The last prompt position's logits, prefill.PREFILL_CHUNK tokens a pass."""
        return chunked(ids, lambda chunk: self._forward(chunk, self.spec if self.sparse_prefill else None, ()), progress)

    def step(self, token: int) -> torch.Tensor:
        """The next token's logits."""
        return self._forward([token], self.spec, self.observers)

    def _forward(self, ids: list[int], spec: SparsitySpec | None, observers: tuple[Observer, ...]) -> torch.Tensor:
        with sparsity(spec, observers, self.dense_route):
            out = self.model.model(torch.tensor([ids], device=self.model.device), cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1]


@dataclasses.dataclass
class Generation:
    text: str
    tokens: list[Token]

    @property
    def tokens_per_second(self) -> float:
        """Decode rate: the first token (the prompt's prefill) is left out when there are others."""
        timed = self.tokens[1:] or self.tokens
        return len(timed) / max(sum(t.seconds for t in timed), 1e-9)


def generate(model: SparseModel, prompt: str | Prompt, spec: SparsitySpec | None = None, **kwargs) -> Generation:
    if isinstance(prompt, str):
        prompt = encode_prompt(model, prompt, max_new_tokens=kwargs.get("max_new_tokens", 64))
    tokens = list(stream(model, prompt, spec, **kwargs))
    return Generation("".join(t.text for t in tokens), tokens)


def first_divergence(a: list[Token], b: list[Token]) -> int | None:
    """Index of the first generated token where two runs differ, None if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.id != y.id:
            return i
    return None


def eos_ids(model: SparseModel) -> set[int]:
    eos = getattr(model.model.generation_config, "eos_token_id", None) or model.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
