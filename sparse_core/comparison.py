"""One prompt through the dense model and a sparse setting side by side, as the Playground runs it: both streams
interleaved one token a round, what the sparse run skipped, the rates of the decode steps both made, and where the
two texts part. Streamlit-free: the Lab makes one (Lab.compare), a caller drives it and draws what it holds.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from . import bench, cost, fast_decode, generate, views
from .models import SparseModel
from .scheduler import SCHEDULER
from .spec import GROUPS, SparsitySpec
from .trace import SparsityCounter

if TYPE_CHECKING:
    from .lab import Lab

RUNS = ("dense", "sparse")


@dataclasses.dataclass
class Comparison:
    """One Generate: both runs' tokens, what the sparse run skipped and the setting that produced them. Filled token
    by token, so a run that is stopped (or interrupted by another click) keeps what it made, marked partial."""
    lab: Lab  # the service of the model it ran on: its report, its traces
    prompt: generate.Prompt
    prompt_text: str  # what the visitor typed (the prompt's ids carry the chat template too)
    spec: SparsitySpec
    method: str
    name: str      # the setting's short name: the method at its target, or the spec's name
    label: str     # the setting as it was asked for (name, dtype, layout, device, prefill, compiled)
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    compiled: bool = False        # the compiled step was asked for
    sparse_prefill: bool = False  # the spec applies to the prompt's prefill too (never counted: decode steps only)
    tokens: dict[str, list[generate.Token]] = dataclasses.field(default_factory=lambda: {run: [] for run in RUNS})
    partial: bool = True
    stage: str = "compiling"  # then "streaming", then "done"
    report: str | None = None  # the report of the finished (or stopped) comparison, built once (Lab.report)
    notes: list[str] = dataclasses.field(default_factory=list)  # why a run decoded uncompiled (one sentence each)
    counters: dict[str, SparsityCounter] = dataclasses.field(
        default_factory=lambda: {run: SparsityCounter() for run in RUNS})  # both, so both pay the observer alike

    @property
    def model(self) -> SparseModel:
        return self.lab.model

    # ---- running it ------------------------------------------------------------------------------------
    def _positions(self) -> int:
        return len(self.prompt.ids) + self.max_new_tokens

    def _waiting(self) -> list[SparsitySpec | None]:
        """The runs' specs whose compiled step would make their first token wait for a compile."""
        if not self.compiled:
            return []
        return [spec for spec in (None, self.spec) if not fast_decode.ready(self.model, spec, self._positions())]

    def compile_wait(self) -> str | None:
        """How long compiling the steps this comparison waits for takes (fast_decode.compile_estimate), or None when
        both runs start at once."""
        waiting = self._waiting()
        fast = fast_decode.decoder(self.model)
        if not waiting or fast is None:
            return None
        return fast_decode.compile_estimate([fast_decode.compile_seconds_on_record(fast, spec, self._positions())
                                             for spec in waiting])

    def compile(self) -> None:
        """Compile the dense and the sparse step before either run starts, so neither run's first token waits for
        it. A step that cannot compile decodes uncompiled: its stream says why with its first token."""
        for spec in self._waiting():
            fast_decode.prepare(self.model, spec, self._positions())

    def run(self, on_token: Callable[[str], None] = lambda run: None,
            on_round: Callable[[], None] = lambda: None,
            on_prefill: Callable[[str, int, int], None] = lambda run, done, total: None) -> None:
        """Both runs, one token of each per round, the run that goes first alternating: the pass right after a page
        update (a browser redrawing on the same cores) is the slower one, and it must not always be the same run.
        `on_token(run)` follows every token, `on_round()` every round that more tokens follow, and
        `on_prefill(run, done, total)` each pass of a run's prompt prefill."""
        self.stage = "streaming"
        streams = {run: generate.stream(self.model, self.prompt, spec, self.max_new_tokens, self.temperature,
                                        self.seed, observers=(self.counters[run],), compiled=self.compiled,
                                        sparse_prefill=self.sparse_prefill, on_prefill=functools.partial(on_prefill, run))
                   for run, spec in zip(RUNS, (None, self.spec))}
        for round_ in itertools.count():
            if not streams or SCHEDULER.closing:  # done, or the server shuts down: kept as a partial result
                break
            for run in sorted(streams, key=RUNS.index, reverse=bool(round_ % 2)):
                token = next(streams[run], None)
                if token is None:
                    del streams[run]
                    continue
                self.tokens[run].append(token)
                if token.note and token.note not in self.notes:
                    self.notes.append(token.note)
                on_token(run)
            if streams:
                on_round()
        self.partial, self.stage = bool(streams), "done"

    def seconds_left(self) -> float | None:
        """How long the runs' remaining tokens take at the pace of their decode steps so far (None before one)."""
        steps = [t.seconds for run in RUNS for t in self.tokens[run][1:]]
        if not steps or self.stage == "done":
            return None
        remaining = sum(self.max_new_tokens - len(self.tokens[run]) for run in RUNS)
        return remaining * statistics.median(steps)

    # ---- what it shows -------------------------------------------------------------------------------------
    def text(self, run: str) -> str:
        return "".join(t.text for t in self.tokens[run])

    @property
    def ran_compiled(self) -> bool:
        """Every decode step of both runs ran the compiled step (the prefill passes are eager by design)."""
        steps = [t for run in RUNS for t in self.tokens[run][1:]]
        return self.compiled and all(t.compiled for t in steps)

    @property
    def produced_by(self) -> str:
        """The setting as it ran: "· compiled" only where every decode step ran compiled."""
        asked = self.label.removesuffix(" · compiled")
        return asked + (" · compiled" if self.ran_compiled else " · uncompiled" if self.compiled else "")

    @property
    def decoder(self) -> str:
        """What decoded its steps, as the report names it."""
        if self.ran_compiled:
            return fast_decode.step_name(self.model, self.spec)
        return "uncompiled step" if self.compiled and fast_decode.covering(self.model, self.spec) else "HF forward"

    @property
    def rates(self) -> bench.PairedRates | None:
        return bench.paired_rates(self.tokens["dense"], self.tokens["sparse"])

    @property
    def flag(self) -> str | None:
        """Why this generation's speed ratio must not be presented (above its bound, or too noisy), if it must not."""
        rates = self.rates
        return None if rates is None else rates.flag(self.cost.bound)

    @property
    def divergence(self) -> int | None:
        """The first generated token where the runs differ, None where one is a prefix of the other."""
        return generate.first_divergence(self.tokens["dense"], self.tokens["sparse"])

    @property
    def divergence_chars(self) -> int | None:
        """Where in the sparse text it first differs from dense (None when it does not)."""
        divergence = self.divergence
        return None if divergence is None else len("".join(t.text for t in self.tokens["sparse"][:divergence]))

    def wrote(self, run: str, index: int) -> str:
        """A generated token as a sentence names it: its text, or what a token without text is."""
        token = self.tokens[run][index]
        if token.text.strip():
            return repr(token.text)
        if token.id in generate.eos_ids(self.model):
            return "the end of the text"
        return repr(token.text) if token.text else f"token {token.id} (part of a character, no text yet)"

    @property
    def achieved(self) -> float:
        """Share of the sparsifiable weight reads the sparse run skipped."""
        return self.counters["sparse"].weighted(self.model.skippable_params(self.method))

    @property
    def cost(self) -> cost.TokenCost:
        return cost.token_cost(self.model, self.achieved)

    @property
    def per_layer(self) -> pd.DataFrame:
        return views.per_layer_frame(self.model, self.counters["sparse"], self.method)

    def skipped_per_token(self) -> dict[str, np.ndarray]:
        """Per group, layers x decode steps: the share skipped in the step that produced each token after the first
        (the prompt's prefill, which produces the first, is not counted)."""
        return {g: np.asarray(self.counters["sparse"].pass_matrix(g, self.model.num_layers), dtype=float)
                for g in GROUPS}

    def decoded_texts(self) -> list[str]:
        """The texts of the sparse run's tokens made by decode steps: the heatmap's columns."""
        return [t.text for t in self.tokens["sparse"][1:]]

    def ids(self) -> tuple[int, ...]:
        """The prompt and the sparse run's tokens: what the heatmaps trace."""
        return self.prompt.ids + tuple(t.id for t in self.tokens["sparse"])
