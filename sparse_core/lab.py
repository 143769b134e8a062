"""One service per loaded model, for whoever drives the engine (the pages, the CLI, bench and selfcheck): the model,
its plain-HF baseline loaded once, the calibrated spec of each (method, target) in one cache, the setting's one
stored quality and decode-speed measurement, sweeps, compile preparation, side-by-side generation and its report,
traces for the heatmaps, and the background preparation of every slider step. Streamlit-free; a progress callback
reports long work to any caller.

The pages import this module, the figures, the views and the spec's value types, nothing else of the engine: what
they need of the vocabulary below (defaults, choices, errors) is named here.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from typing import Callable, ContextManager, Iterator, Sequence

import pandas as pd

from . import (bench, calibrate, comparison, fast_decode, figures, generate, metrics, models, ops, peer, prefill,
               scheduler, stakeholder_report, tuning, views, warmup)
from .calibrate import Progress
from .scheduler import SCHEDULER, describe
from .spec import SparsitySpec
from .store import BoundedCache, DiskStore, digest

# ---- the engine's vocabulary, as callers of the service name it ------------------------------------------
DEFAULT_MODEL, DEVICES, resolve_device = models.DEFAULT_MODEL, models.DEVICES, models.resolve_device
ModelLoadError, GenerationError = models.ModelLoadError, generate.GenerationError
QUALITY_TOKENS, PROTOCOLS = metrics.QUALITY_TOKENS, metrics.PROTOCOLS
RUNS = comparison.RUNS
PREFILL_CHUNK = prefill.PREFILL_CHUNK
KERNEL_SHAPES, KERNEL_DTYPES = bench.SHAPES, bench.DTYPES
KERNEL_SPARSITIES, QUICK_KERNEL_SPARSITIES = bench.SPARSITIES, bench.QUICK_SPARSITIES
FULL_REPEATS, QUICK_REPEATS = bench.FULL_REPEATS, bench.QUICK_REPEATS
DECODE_TOKENS, DECODE_REPEATS = bench.DECODE_TOKENS, bench.DECODE_REPEATS
kernel_benchmark = bench.kernel_benchmark
points_frame = tuning.points_frame
VISITOR, JOB = scheduler.VISITOR, scheduler.JOB  # the ranks of heavy work (foreground)
describe_backends = ops.describe_backends

# At exit (a SIGTERM to the server included) the heavy work in flight ends at its next chunk and is waited for: a
# thread still inside torch when the interpreter ends aborts the process, and a measurement cut off mid-way is
# never stored.
atexit.register(SCHEDULER.close, 60.0)

MAX_SPECS = 256  # calibrated specs kept in memory (each is a few KB; on disk they come back in milliseconds)
_LOAD_SECONDS = DiskStore("load_seconds", 1)


def load_estimate(name: str, dtype: str, layout: str, device: str) -> str:
    """How long loading this model takes, as the wait for it says: the last load on this machine, or what a first
    load does."""
    last = _LOAD_SECONDS.load(digest(name, dtype, layout, device))
    if last:
        return f"about {last['seconds']:.0f} s last time"
    if name == DEFAULT_MODEL:
        return "the first time on this machine the embedded model is converted once"
    return "the first time it is downloaded (safetensors only) and patched"


def describe_protocol(name: str, held_out_tokens: int) -> str:
    """How a quality figure was measured, in the words every surface shows beside it."""
    return metrics.protocol_of(name).describe(held_out_tokens)


@contextlib.contextmanager
def foreground(what: str, rank: int = VISITOR, timed: bool = True,
               waiting: Callable[[str], ContextManager] | None = None,
               left: Callable[[], float | None] = lambda: None) -> Iterator[None]:
    """Heavy work in the scheduler's queue: `what` (a noun phrase, as whoever waits behind it reads it) at `rank`,
    VISITOR for what a visitor's page waits for, JOB for a long job a visitor started (a benchmark), which first lets
    visitors' requests in flight finish. Lower ranks (background preparation, of any model) hold still meanwhile.
    Before timed work a background compile in flight, which cannot be interrupted, is waited for; each wait inside
    `waiting(why)` when given (a caller's notice of what it waits for). `left()` says how long it has left, if known,
    to whoever waits behind it."""
    ahead = SCHEDULER.ahead_of(rank) if rank > VISITOR else []
    if ahead:
        with waiting(f"{describe(ahead)} to finish first") if waiting else contextlib.nullcontext():
            SCHEDULER.wait_turn(rank)
    with SCHEDULER.running(what, rank, left):
        compiling = warmup.compile_in_flight() if timed else None
        if compiling is not None:
            with (waiting(f"{compiling.describe()} to finish first: a compile cannot be interrupted, and nothing "
                          "is timed beside one") if waiting else contextlib.nullcontext()):
                warmup.wait_for_compiles()
        yield


def wait_turn(rank: int) -> None:
    """Hold still while heavy work of a higher rank runs (between the chunks of a job of `rank`)."""
    SCHEDULER.wait_turn(rank)


class Lab:
    """A loaded model and what is measured on it. Shared between threads (browser sessions): every method is safe to
    call from several at once, and each measurement is made once per setting (the stores on disk keep it)."""

    def __init__(self, model: models.SparseModel, trust_remote_code: bool = False):
        self.model = model
        self._trust_remote_code = trust_remote_code
        self._plain: models.SparseModel | None = None
        self._lock = threading.Lock()
        self._specs = BoundedCache(MAX_SPECS)
        self._preparation: warmup.Warmup | None = None

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, dtype: str = "float32", layout: str = "inputs", device: str = "auto",
             trust_remote_code: bool = False, device_map: str | None = None) -> Lab:
        """Load (or convert, the first time) and patch a model; how long it took is kept for load_estimate."""
        started = time.monotonic()
        model = models.load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, layout=layout,
                            device_map=device_map)
        _LOAD_SECONDS.save(digest(name, dtype, layout, model.device.type),
                           {"seconds": round(time.monotonic() - started, 1)})
        return cls(model, trust_remote_code)

    # ---- what the model is -------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """What a result that covers several specs (a sweep) was measured on."""
        return f"{self.model.name} · {self.setup}"

    @property
    def setup(self) -> str:
        """How the model runs, as every result's label says it: dtype (or int8 weights), weight layout, device."""
        return f"{self.weights_label} · {self.model.layout} layout · {self.model.device.type}"

    @property
    def weights_label(self) -> str:
        """The weights as every label and the report name them: the dtype, or "int8 weights"."""
        return "int8 weights" if self.model.int8 else self.dtype

    @property
    def dtype(self) -> str:
        return self.model.weights

    @property
    def key(self) -> tuple:
        """What tells this model's results from another's (a result kept in a browser session carries it)."""
        model = self.model
        return model.name, self.dtype, model.layout, str(model.device), model.fingerprint

    @property
    def why_not_compiled(self) -> str | None:
        """Why the fast decode step (native on the CPU, compiled on a GPU) does not cover this model, or None."""
        return fast_decode.why_not_covered(self.model)

    @property
    def compiles_by_default(self) -> bool:
        return fast_decode.compile_by_default(self.model)

    def info(self) -> dict:
        model = self.model
        return {"model": model.name, "fingerprint": model.fingerprint, "dtype": self.dtype,
                "device": str(model.device), "layers": model.num_layers, "gated_mlp": model.gated,
                "layout": model.layout, "group_widths": model.group_widths,
                "sparsifiable_params": sum(sum(p.values()) for p in model.group_params),
                "total_params": sum(p.numel() for p in model.model.parameters()), "backend": describe_backends()}

    def plain(self) -> models.SparseModel | None:
        """The same weights in HF's own layout with no kernels, the baseline every decode speed is also measured
        against; loaded on first use, once. None where this model is that already (the hf layout) or where HF's
        own forward has no such weights (int8 rows)."""
        if self.model.layout == "hf" or self.model.int8:
            return None
        with self._lock:
            if self._plain is None:
                self._plain = models.load(self.model.name, dtype=self.dtype, device=self.model.device.type,
                                          layout="hf", trust_remote_code=self._trust_remote_code)
            return self._plain

    # ---- specs -------------------------------------------------------------------------------------------
    def spec_for(self, method: str, target: float, progress: Progress | None = None) -> SparsitySpec:
        """The calibrated spec of `method` at `target` on the calibration text (top-k and dense need no
        calibration), from the cache when it was made before."""
        spec = self.known_spec(method, target)
        if spec is None:
            spec = self._specs.put((method, round(target, 4)),
                                   calibrate.calibrate(self.model, method, target, progress=progress))
        return spec

    def known_spec(self, method: str, target: float) -> SparsitySpec | None:
        """The spec of `method` at `target` if it is in the cache: no calibration, nothing to wait for."""
        return self._specs.get((method, round(target, 4)))

    def calibrate(self, method: str, target: float | Sequence[Sequence[float]], text: str | None = None,
                  allocation: str = "uniform", progress: Progress | None = None) -> SparsitySpec:
        """A spec made now: `target` uniform, or a [layer][group] table, on `text` (None: the calibration text), or
        greedily allocated (TEAL's), each block reaching `target` where skipping hurts least."""
        if allocation == "greedy":
            return tuning.greedy_specs(self.model, method, [target], text=text, progress=progress)[target]
        if text is None and isinstance(target, (int, float)):
            return self.spec_for(method, target, progress)
        return calibrate.calibrate(self.model, method, target, text=text, progress=progress)

    def check(self, spec: SparsitySpec | None) -> None:
        """Raise SpecError (one sentence) when the spec cannot run on this model."""
        self.model.check(spec)

    # ---- quality -----------------------------------------------------------------------------------------
    def quality(self, spec: SparsitySpec, text: str | None = None, max_tokens: int | None = None,
                protocol: str = metrics.DEFAULT_PROTOCOL, progress: Progress | None = None) -> metrics.Evaluation:
        """The setting's quality measurement (by default the one every surface shows): from disk when known, else
        measured once now."""
        return metrics.measured(self.model, spec, text=text, max_tokens=max_tokens, progress=progress,
                                protocol=protocol)

    def stored_quality(self, spec: SparsitySpec) -> metrics.Evaluation | None:
        return metrics.stored(self.model, spec)

    def sweep(self, methods: Sequence[str], targets: Sequence[float], allocations: Sequence[str] = ("uniform",),
              text: str | None = None, max_tokens: int | None = None, protocol: str = metrics.DEFAULT_PROTOCOL,
              progress: Progress | None = None) -> pd.DataFrame:
        """Quality against sparsity, one row per (method, allocation, target)."""
        return tuning.sweep(self.model, methods, targets, allocations, text=text, max_tokens=max_tokens,
                            progress=progress, protocol=protocol)

    def start_sweep(self, methods: Sequence[str], targets: Sequence[float], allocations: Sequence[str] = ("uniform",),
                    text: str | None = None, max_tokens: int | None = None,
                    protocol: str = metrics.DEFAULT_PROTOCOL) -> tuning.SweepJob:
        """The sweep in a background thread (tuning.SweepJob), a job in the scheduler's queue: behind a visitor's
        request, ahead of background preparation."""
        return tuning.start_sweep(self.model, methods, targets, allocations, text=text, max_tokens=max_tokens,
                                  protocol=protocol, measured_on=self.label)

    # ---- speed -------------------------------------------------------------------------------------------
    def decode_speed(self, spec: SparsitySpec | None, compiled: bool) -> dict | None:
        """The setting's valid decode measurement on this machine, if there is one."""
        return bench.stored_decode(self.model, spec, compiled)

    def flagged_decode(self, spec: SparsitySpec | None, compiled: bool) -> dict | None:
        """The setting's last decode measurement when it was flagged (busy machine, above its bound)."""
        return bench.flagged_decode(self.model, spec, compiled)

    def measure_decode(self, spec: SparsitySpec | None, compiled: bool, new_tokens: int | None = None,
                       repeats: int | None = None, progress: Progress | None = None) -> dict:
        """Time the setting's greedy decode against the fastest dense, plain HF included, and store it."""
        return bench.decode_result(self.model, spec, bench.DECODE_TOKENS if new_tokens is None else new_tokens,
                                   bench.DECODE_REPEATS if repeats is None else repeats, plain=self.plain(),
                                   progress=progress, compiled=compiled)

    def token_profile(self, spec: SparsitySpec | None, new_tokens: int, repeats: int) -> dict:
        """Where one token of the native step goes, phase by phase, the weights' reads beside the probe."""
        from . import token_profile
        return token_profile.profile(self.model, spec, new_tokens, repeats)

    def layer_times(self, spec: SparsitySpec | None, new_tokens: int = 8) -> views.StepBreakdown:
        """Each decoder layer's time in a decode step, dense against `spec`, interleaved."""
        return views.decode_step_breakdown(self.model, generate.encode_prompt(self.model, bench.PROMPT), spec,
                                           new_tokens=new_tokens)

    def peer(self) -> tuple[str, pd.DataFrame] | None:
        """This machine's stored `bench peer` result (llama.cpp beside the lab) as every surface shows it: its
        caption and its table; None when it was never measured."""
        result = peer.stored(self.model.device.type)
        return None if result is None else (peer.caption(result), peer.table(result))

    # ---- generation --------------------------------------------------------------------------------------
    def prompt(self, text: str, chat: bool = True, max_new_tokens: int = 0) -> generate.Prompt:
        """The prompt's token ids (through the chat template when the model has one); GenerationError if empty."""
        return generate.encode_prompt(self.model, text, chat=chat, max_new_tokens=max_new_tokens)

    def stream(self, prompt: generate.Prompt, spec: SparsitySpec | None, **how) -> Iterator[generate.Token]:
        """One run's tokens as they are made (generate.stream's options)."""
        return generate.stream(self.model, prompt, spec, **how)

    def compare(self, prompt_text: str, spec: SparsitySpec, method: str, name: str, label: str, max_new_tokens: int,
                temperature: float = 0.0, seed: int = 0, compiled: bool = False,
                sparse_prefill: bool = False) -> comparison.Comparison:
        """The same prompt dense and sparse, side by side, ready to run (GenerationError for a bad prompt)."""
        prompt = self.prompt(prompt_text, max_new_tokens=max_new_tokens)
        return comparison.Comparison(self, prompt, prompt_text, spec, method, name, label, max_new_tokens,
                                     temperature, seed, compiled, sparse_prefill)

    def report(self, run: comparison.Comparison) -> str:
        """A comparison as one offline HTML file: the setting's headline numbers (its stored quality and valid speed
        measurements, the same the headline card shows), both texts, the live heatmap's final state, the speed and
        quality charts with the bound, llama.cpp's rates beside the lab's (bench peer), and the machine."""
        spec = run.spec
        quality = self.quality(spec)
        speed = self.decode_speed(spec, run.compiled)
        flagged = self.flagged_decode(spec, run.compiled)
        setting = dict(model=self.model.name, method=run.method, spec=run.name, target=spec.uniform_target,
                       dtype=self.weights_label, layout=self.model.layout, device=self.model.device.type, decoder=run.decoder,
                       generation=(f"Partial result: stopped after {len(run.tokens['sparse'])} sparse and "
                                   f"{len(run.tokens['dense'])} dense tokens" if run.partial else "complete"))
        headline = dict(weight_reads_skipped=quality.weight_reads_skipped, bound=quality.bound,
                        ppl_dense=quality.ppl_dense, ppl_sparse=quality.ppl_sparse, ppl_increase=quality.ppl_increase,
                        top1_agreement=quality.top1_agreement, kl=quality.kl, quality_protocol=quality.protocol_label,
                        flag=flagged["flag"] if flagged and not speed else None,
                        speedup=speed["speedup"] if speed else None,
                        speedup_iqr=speed["speedup_iqr"] if speed else None,
                        sentence=views.headline_sentence(quality, speed))
        charts = {f"Skipped share per layer and decode step ({run.name})":
                  figures.live_heatmaps(run.skipped_per_token(), run.decoded_texts())}
        if speed:
            charts[f"Decode speed against the bound ({speed['new_tokens']} steps × {speed['repeats']} runs, "
                   f"dense path “{speed['dense_path']}”)"] = figures.decode_speed_figure(speed)
        elif run.rates is not None:
            rates = run.rates
            charts[f"This generation's rates against the bound ({rates.steps} equal steps; not the setting's "
                   f"decode measurement)"] = figures.speed_figure(rates.dense, rates.sparse, run.cost.bound)
        charts[f"Quality: {quality.protocol_label}"] = figures.quality_figure(
            quality.ppl_dense, quality.ppl_sparse, quality.top1_agreement)
        texts = {"prompt": run.prompt_text, "dense": run.text("dense"), "sparse": run.text("sparse")}
        return stakeholder_report.build(setting, headline, texts, run.divergence_chars, charts,
                                        peer=peer.stored(self.model.device.type))

    def token_ids(self, text: str) -> tuple[int, ...]:
        """Plain text's token ids, no template: what the heatmaps trace."""
        return tuple(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def trace(self, spec: SparsitySpec | None, ids: Sequence[int], layer: int,
              dense_prefix: int = 0) -> views.TokenTrace:
        """`ids` traced for the heatmaps (views.trace_tokens: the first `dense_prefix` dense, the rest sparse)."""
        return views.trace_tokens(self.model, spec, ids, layer, dense_prefix=dense_prefix)

    # ---- the background preparation ----------------------------------------------------------------------
    def preparation(self) -> warmup.Warmup | None:
        """Every slider step calibrated and measured in the background (warmup.Warmup), made once and working while
        a visitor holds a lease on it (Warmup.lease); None when SPARSE_LAB_WARMUP=0 (the tests, which time things)."""
        if os.environ.get("SPARSE_LAB_WARMUP", "1") == "0":
            return None
        with self._lock:
            if self._preparation is None:
                self._preparation = warmup.Warmup(self.model, measure_speed=self.measure_decode)
            return self._preparation

    def close(self) -> None:
        """The model is let go (evicted): its preparation stops for good."""
        with self._lock:
            if self._preparation is not None:
                self._preparation.stop()
