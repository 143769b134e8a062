"""What every page shares: the model (one per name and dtype, shared by all visitors), calibrated specs and their
quality cost (cached per model, method and target), the settings sidebar, and small rendering helpers.

Not registered in app.py's navigation, so it never shows as a page.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import time
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import streamlit as st
import torch

from sparse_core import lab, views
from sparse_core.spec import SparsitySpec, SpecError

METHODS = {"TEAL thresholds": "teal", "CATS gate": "cats", "top-k": "topk"}
METHODS_BY_KEY = {key: label for label, key in METHODS.items()}
METHOD_HELP = ("TEAL skips every projection input whose magnitude is below a calibrated threshold. "
               "CATS thresholds only the gated MLP's intermediate (and skips those neurons' weights in down, and in "
               "up too with the cats weight layout). "
               "Top-k keeps the largest inputs of each token; it needs no calibration.")
DEFAULTS = dict(model_name=lab.DEFAULT_MODEL, dtype="float32", device="auto", layout="inputs", method_label="TEAL thresholds", target=0.25,
                max_new_tokens=48, sample=False, temperature=0.8, seed=0, sparse_prefill=False, trust_remote_code=False)
# Prompts covering what people use LLMs for; the chat template is applied by generate.encode_prompt.
PRESETS = {
    "Chat question": "What is the capital of France, and what is it famous for?",
    "Translation": "Translate into French: I am tired.",
    "Sentiment": ("Review: \"The battery died after two days and support never answered.\" "
                  "Is this review positive or negative? Answer with one word."),
    "Summarisation": ("Summarize this in one short sentence: The school library will close for repairs next week. "
                      "Students can borrow books from the town library instead. "
                      "The school library reopens on Monday the 12th."),
    "A story": "Tell me a short story about a dog and a boy.",
}  # each verified: the dense greedy answer is right (docs/PRESETS.md)
LOGO = Path(__file__).resolve().parent.parent / "assets" / "logo.svg"
TARGET_LABELS = {"teal": "Inputs skipped (target)", "topk": "Inputs skipped (target)", "cats": "MLP neurons skipped (target)"}
TARGET_HELP = {
    "teal": "The share of every projection's inputs to skip, turned into one |x| threshold per layer and projection "
            "group on the calibration text. What it saves is measured: see “Reads skipped (measured)”.",
    "topk": "The share of every projection's inputs each token drops (its smallest |x|). What it saves is measured: "
            "see “Reads skipped (measured)”.",
    "cats": "CATS thresholds |act(gate(x))|, the gated MLP's intermediate activation: this share of each layer's MLP "
            "neurons is skipped (their rows of down, and of up in the cats layout); attention and the MLP input stay "
            "dense, so far fewer weight reads are skipped: see “Reads skipped (measured)”.",
}


@dataclasses.dataclass(frozen=True)
class Selection:
    """One visitor's choices from the sidebar, plus the model (its Lab) and spec they resolve to (spec None:
    unusable)."""
    lab: lab.Lab
    method: str
    target: float
    spec: SparsitySpec | None
    max_new_tokens: int
    temperature: float
    seed: int
    name: str  # what produced a result: the method at its target, or the Tuner spec's name
    compiled: bool = False  # decode with the compiled step (fast_decode)
    sparse_prefill: bool = False  # the spec applies to the prompt's prefill too (default: dense prefill)

    @property
    def model(self):
        """The loaded model (models.SparseModel): its shape and tokenizer, for what the pages draw."""
        return self.lab.model

    @property
    def method_label(self) -> str:
        return METHODS_BY_KEY[self.method]

    @property
    def label(self) -> str:
        """Every result carries this: method and target or spec name, dtype, layout, device, a sparse prefill when
        asked for, and the compiled step when it decodes with it."""
        return (f"{self.name} · {self.lab.setup}" + (" · sparse prefill" if self.sparse_prefill else "")
                + (" · compiled" if self.compiled else ""))


LAYOUT_HELP = {"inputs": "Every projection stores each input's weights contiguously: TEAL and top-k skip reads in all "
                          "seven projections; CATS skips only down's.",
               "cats": "up_proj keeps its rows: CATS also skips the up rows of inactive neurons; TEAL and top-k then "
                       "read all of up."}


@st.cache_resource(show_spinner=False, max_entries=3, on_release=lab.Lab.close)
def load_lab(name: str, dtype: str, layout: str = "inputs", device: str = lab.resolve_device("auto"),
             trust_remote_code: bool = False) -> lab.Lab:
    """One model (its Lab) per name, dtype, layout and (resolved, never "auto") device, shared by every visitor; its
    background preparation stops when it is evicted."""
    return lab.Lab.load(name, dtype, layout, device, trust_remote_code)


def progress_text(label: str, done: int, total: int, left: float | None) -> str:
    """What every progress bar says: the steps done, and the time left when it is known."""
    return f"{label} {done}/{total}" + (f" · about {left:.0f} s left" if left is not None else "")


@contextlib.contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar for long work, gone when the work ends: yields the (done, total) callback the engine reports
    to, which moves the bar and estimates the time left from the pace so far."""
    bar = st.progress(0.0, text=label)
    started = time.monotonic()

    def update(done: int, total: int) -> None:
        left = (time.monotonic() - started) / done * (total - done) if 0 < done < total else None
        bar.progress(min(done / max(total, 1), 1.0), text=progress_text(label, done, total, left))
    try:
        yield update
    finally:
        bar.empty()


@st.cache_resource(scope="session", max_entries=1, show_spinner=False, on_release=lambda lease: lease.release())
def _visitor_lease(_prepared, key: tuple):
    """This visitor uses this model: one lease per session on its background preparation, released when they move
    to another model or leave."""
    return _prepared.lease()


def prepare_ahead(held: lab.Lab):
    """The model's background preparation of every slider step (Lab.preparation, None when off), leased by this
    visitor."""
    prepared = held.preparation()
    if prepared is not None:  # a model loaded again after an eviction is a new Lab: a new preparation, a new lease
        _visitor_lease(prepared, (*held.key, id(prepared)))
    return prepared


@contextlib.contextmanager
def foreground(what: str, notice=None, timed: bool = True, rank: int = lab.VISITOR,
               left: Callable[[], float | None] = lambda: None) -> Iterator[None]:
    """Heavy work in the lab's one queue (lab.foreground): `what` at `rank`, background preparation holding still;
    whatever it waits for first (a visitor's request ahead of a job, a compile in flight before timed work) shows
    as a spinner that says what and for how long (in `notice`, a placeholder beside the button that asked, when
    given)."""
    @contextlib.contextmanager
    def waiting(why: str) -> Iterator[None]:
        with (notice.container() if notice else contextlib.nullcontext()), st.spinner(f"Waiting for {why}…",
                                                                                        show_time=True):
            yield
    with lab.foreground(what, rank, timed, waiting, left):
        yield


def quality(held: lab.Lab, spec: SparsitySpec):
    """The setting's one quality measurement (Lab.quality): from disk when known, else measured once here."""
    with foreground("a visitor's quality measurement"), progress(f"Measuring the quality cost on {lab.QUALITY_TOKENS:,} held-out tokens, dense "
                                "prefill and sparse decode (once per setting)…") as update:
        return held.quality(spec, progress=update)


def measure_decode(current: Selection, progress=None) -> dict:
    """The setting's decode measurement (Lab.measure_decode, stored): against the fastest dense, plain HF included."""
    def between_runs(done: int, total: int) -> None:  # a visitor's request that came meanwhile goes first
        if progress:
            progress(done, total)
        lab.wait_turn(lab.JOB)
    with foreground("timing the decode of a setting", rank=lab.JOB):
        return current.lab.measure_decode(current.spec, current.compiled, progress=between_runs)


def spec_for(held: lab.Lab, method: str, target: float) -> SparsitySpec:
    """The calibrated spec for this setting (Lab.spec_for); computed with a progress bar on first use, then shared."""
    known = held.known_spec(method, target)
    if known is not None:
        return known
    label = f"Calibrating {method.upper()} thresholds for {target:.0%} sparsity on the calibration text (first use only)…"
    with foreground("a visitor's calibration"), progress(label) as update:
        return held.spec_for(method, target, progress=update)


def _loading(name: str, dtype: str, layout: str, device: str, trust_remote_code: bool, notice) -> lab.Lab:
    """load_lab, announced in the main area (`notice`) with the time the same load last took on this machine."""
    with notice.container(), st.spinner(f"Preparing {name} ({dtype}, {layout} layout, {device}): loading the weights "
                                        f"and storing them for the kernels — "
                                        f"{lab.load_estimate(name, dtype, layout, device)}…", show_time=True):
        return load_lab(name, dtype, layout, device, trust_remote_code)


def _resolve_model(name: str, dtype: str, layout: str, device: str, trust_remote_code: bool,
                   notice) -> lab.Lab:
    """The requested model, or (with a one-sentence error) the last one that loaded, so the page keeps working."""
    name = name.strip() or lab.DEFAULT_MODEL
    try:
        device = lab.resolve_device(device)
        held = _loading(name, dtype, layout, device, trust_remote_code, notice)
    except Exception as err:  # noqa: BLE001 - a user-typed id can fail in many ways; each becomes one sentence
        message = str(err) if isinstance(err, lab.ModelLoadError) else f"Could not load model {name!r} ({type(err).__name__}: {err})."
        st.sidebar.error(message)
        fallback = st.session_state.get("last_loaded", (lab.DEFAULT_MODEL, "float32", "inputs", lab.resolve_device("auto")))
        if fallback == (name, dtype, layout, device):
            st.stop()
        st.sidebar.caption(f"Still using {fallback[0]} ({fallback[1]}, {fallback[3]}).")
        return load_lab(*fallback)
    st.session_state.last_loaded = (name, dtype, layout, device)
    return held


def _device_label(device: str) -> str:
    """The Device select's options, saying what each means on this machine."""
    if device == "auto":
        return f"auto ({lab.resolve_device('auto')} here)"
    if device == "cuda" and not torch.cuda.is_available():
        return "cuda (none on this machine)"
    return device


def _compiled_toggle(held: lab.Lab) -> bool:
    """The compiled decode step: on by default where the model supports it (SPARSE_LAB_COMPILE=0 turns the default
    off); greyed out, with the reason, where it does not."""
    why_not = held.why_not_compiled
    st.session_state.setdefault("compiled", held.compiles_by_default)
    on = st.toggle("Compiled decode step", key="compiled", disabled=why_not is not None,
                   help=why_not and f"Unavailable: {why_not}." or
                   "Decode with the lab's own one-token step (static KV cache, q|k|v and gate|up as one sparse call "
                   "each) instead of HF's forward: same tokens, less time per token. On the CPU every method runs it "
                   "as one native call per token, nothing to compile; on a GPU it runs under torch.compile, whose "
                   "first compile of a setting on that machine takes a minute or two; later ones load from the cache.")
    return on and why_not is None


@dataclasses.dataclass(frozen=True)
class Choices:
    """What the sidebar says this run, before a spec is resolved for it (the page does that: it may calibrate)."""
    lab: lab.Lab
    method: str
    target: float
    max_new_tokens: int
    temperature: float
    seed: int
    compiled: bool
    sparse_prefill: bool
    applied: tuple[str, SparsitySpec] | None  # the Tuner's spec, when the visitor generates with it


def sidebar() -> None:
    """Draw the settings once per run, from app.py before the page: the same widgets on every page, so Streamlit
    keeps their values across pages by itself. Every widget is drawn before the model loads, so a run that a page
    change interrupts during a load has registered them all. The page reads the outcome with current()."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)  # the first run only: never written over a visitor's choice
    st.logo(str(LOGO), size="large")
    notice = st.empty()  # at the top of the main area: what is being prepared
    with st.sidebar:
        st.header("Model")
        name = st.text_input("Model", key="model_name", label_visibility="collapsed",
                             help="The embedded default, a Hugging Face id (safetensors weights) or a local folder.")
        dtype = st.selectbox("Weights", ["float32", "bfloat16", "int8"], key="dtype",
                             help="int8: the projections and the head as int8 rows with a scale per 64 inputs, "
                                  "activations in float32 (CPU, inputs layout; docs/QUANTIZATION.md).")
        device = st.selectbox("Device", lab.DEVICES, key="device", format_func=_device_label,
                              help="Where the model runs. auto takes the GPU when torch sees one (the Triton kernels), "
                                   "else the CPU (the native C++ kernel).")
        layout = st.selectbox("Weight layout", list(LAYOUT_HELP), key="layout",
                              help="How the model's one copy of the weights is stored for the kernels; each layout "
                                   "in use is its own model in memory, shared by all visitors. " + " ".join(
                                  f"{choice}: {text}" for choice, text in LAYOUT_HELP.items()))
        trust = st.toggle("Run the model's own code (trust_remote_code)", key="trust_remote_code",
                          help="Off by default. Only for models whose repository ships Python code you have read and "
                               "trust: it runs on this machine with your permissions.")
        about_model = st.container()  # filled once the model is loaded

        st.header("Sparsity")
        method = METHODS[st.radio("Method", list(METHODS), key="method_label", help=METHOD_HELP)]
        target = st.slider(TARGET_LABELS[method], 0.0, 0.9, step=0.05, key="target", help=TARGET_HELP[method])
        st.header("Generation")
        max_new_tokens = st.slider("Max new tokens", 1, 256, key="max_new_tokens")
        sample = st.toggle("Sample (otherwise greedy)", key="sample")
        # Drawn greyed out when greedy, so the visitor's temperature and seed stay for the next sampled run.
        temperature = st.slider("Temperature", 0.1, 2.0, step=0.1, key="temperature", disabled=not sample)
        seed = int(st.number_input("Seed", 0, 2**31 - 1, key="seed", disabled=not sample))
        temperature, seed = (temperature, seed) if sample else (0.0, 0)
        sparse_prefill = st.toggle("Sparse prefill", key="sparse_prefill",
                                   help="Off (the default): the prompt's prefill runs dense and the spec applies to "
                                        "the decode steps. A prefill is compute-bound, so skipping buys nothing there, "
                                        "and a thresholded prompt's KV cache costs every later token quality. On: the "
                                        "prompt runs sparse too, to study that cost. Counts and heatmaps cover the "
                                        "decode steps either way.")
        model_bound = st.container()  # the widgets that depend on the model
    held = _resolve_model(name, dtype, layout, device, trust, notice)
    model = held.model
    with about_model:
        prepared = prepare_ahead(held)
        if prepared is not None and prepared.working and not prepared.finished:
            st.caption(f"Preparing every slider step in the background: {prepared.done}/{len(prepared.plan)} settings "
                       "calibrated and measured, so the slider answers in seconds.")
        st.caption(f"{model.num_layers} layers, {'gated' if model.gated else 'plain'} MLP")
    with model_bound:
        compiled = _compiled_toggle(held)
        applied = st.session_state.get("applied_spec")
        use_applied = applied is not None and applied[1].model_fingerprint == model.fingerprint and st.toggle(
            f"Use the Tuner's spec “{applied[0]}”", value=True, key="use_applied",
            help="Generate with the spec applied on the Tuner page instead of the method and slider above.")
    st.session_state.choices = Choices(held, method, target, max_new_tokens, temperature, seed, compiled,
                                       sparse_prefill, applied if use_applied else None)


def current() -> Selection:
    """This run's sidebar choices resolved to a model and a spec (calibrated with a progress bar on first use; spec
    None, with the reason shown, when it cannot run on the model)."""
    chosen: Choices = st.session_state.choices
    method = chosen.method
    try:
        spec = chosen.applied[1] if chosen.applied else spec_for(chosen.lab, method, chosen.target)
        chosen.lab.check(spec)
    except SpecError as err:
        st.error(str(err))
        spec = None
    if chosen.applied and spec is not None:
        method = spec.method
    name = f"Tuner spec “{chosen.applied[0]}”" if chosen.applied else f"{METHODS_BY_KEY[method]} at {chosen.target:.0%}"
    return Selection(chosen.lab, method, chosen.target, spec, chosen.max_new_tokens, chosen.temperature, chosen.seed, name,
                    chosen.compiled, chosen.sparse_prefill)


MAX_UPLOAD_BYTES = 1 << 20  # texts and specs: parsed as UTF-8 / JSON, never executed


def _read_upload(upload) -> str:
    if upload.size > MAX_UPLOAD_BYTES:
        raise SpecError(f"{upload.name} is {upload.size / 2**20:.1f} MiB; uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB.")
    try:
        return upload.getvalue().decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{upload.name} is not UTF-8 text.") from None


def uploaded_text(label: str, key: str) -> str | None:
    """A user's own .txt file (size-limited, UTF-8), or None for the project's default text."""
    upload = st.file_uploader(label, type=["txt"], key=key, help=f"Plain UTF-8 text, up to {MAX_UPLOAD_BYTES // 2**20} MiB.")
    if upload is None:
        return None
    try:
        text = _read_upload(upload)
    except SpecError as err:
        st.error(str(err))
        return None
    if not text.strip():
        st.error(f"{upload.name} is empty; using the default text.")
        return None
    return text


def read_spec(upload) -> SparsitySpec:
    """An uploaded spec JSON, validated (raises SpecError with one sentence)."""
    return SparsitySpec.from_json(_read_upload(upload))


def speedup_delta(ratio: float) -> dict:
    """st.metric delta arguments that read a slowdown as one: red and down, never a green up-arrow."""
    faster = ratio >= 1.0
    return dict(delta=f"×{ratio:.2f}: {'faster' if faster else 'slower'}", delta_color="green" if faster else "red",
                delta_arrow="up" if faster else "down")


@st.fragment(run_every=1.0)
def _await_quality(held: lab.Lab, spec: SparsitySpec, prepared) -> None:
    """What the headline waits for, said again every second; reruns the page once the background measurement of
    this setting's quality is on disk."""
    if held.stored_quality(spec) is not None or not prepared.working:
        st.rerun()  # measured, or the preparation cannot measure it (stopped, failed): the page measures it itself
    last = prepared.measure_seconds
    takes = f"the measurement itself took {last:.0f} s last time" if last else "the measurement itself takes seconds"
    st.info(f"Measuring this setting's quality on {lab.QUALITY_TOKENS:,} held-out tokens in the background, first "
            f"in line ({takes}). Now: {prepared.status()}. Generate works meanwhile.")


@st.fragment(run_every=2.0)
def _await_speed(held: lab.Lab, spec: SparsitySpec, compiled: bool, prepared) -> None:
    """The headline's decode speedup while it is timed in the background; reruns the page once it is stored (or
    flagged, or the preparation cannot time it)."""
    if (held.decode_speed(spec, compiled) is not None or held.flagged_decode(spec, compiled) is not None
            or not prepared.working):
        st.rerun()
    st.metric("Decode speedup", "…", help="Timed in the background, in a quiet moment: dense and sparse decoding of "
                                         "this setting, interleaved, once; stored for every page.")
    st.caption(f"Timed while nothing else runs (now: {prepared.status()}).")


def headline(current: Selection) -> None:
    """The Playground's first card: what the current setting skips, gains and costs, each measured once for it.
    With the background preparation on, a setting not measured yet is measured there, first in line, while the
    page stays usable; the card fills in when it is done."""
    prepared = prepare_ahead(current.lab)
    quality_now = current.lab.stored_quality(current.spec)
    if quality_now is None and prepared is not None and prepared.working:
        prepared.request(current.spec)
        with st.container(border=True, key="headline"):
            st.markdown(f"**{current.label}**")
            _await_quality(current.lab, current.spec, prepared)
        return
    quality_now = quality_now or quality(current.lab, current.spec)
    speed = current.lab.decode_speed(current.spec, current.compiled)
    flagged = current.lab.flagged_decode(current.spec, current.compiled)
    with st.container(border=True, key="headline"):
        st.markdown(f"**{current.label}**")
        cols = st.columns(5)
        cols[0].metric("Reads skipped (measured)", f"{quality_now.weight_reads_skipped:.1%}",
                       help=f"Share of all weight bytes read per token that this setting skips, measured on "
                            f"{quality_now.held_out_tokens:,} held-out tokens (embeddings, norms and the output head are read in full).")
        timing = speed is None and flagged is None and prepared is not None and prepared.working
        if timing:
            prepared.request_speed(current.spec, current.compiled)
            with cols[1]:
                _await_speed(current.lab, current.spec, current.compiled, prepared)
        elif speed is not None:
            cols[1].metric("Decode speedup", f"×{speed['speedup']:.2f}",
                           f"IQR ×{speed['speedup_iqr'][0]:.2f}–×{speed['speedup_iqr'][1]:.2f}", delta_color="off", delta_arrow="off",
                           help=f"Greedy decode with the {speed['decoder']}, {speed['sparse_tok_s']:.1f} sparse vs "
                                f"{speed['dense_tok_s']:.1f} tok/s on the fastest dense path ({speed['dense_path']}; plain HF "
                                f"{speed['plain_hf_tok_s'] or '—'}), median of {speed['repeats']} interleaved runs of "
                                f"{speed['new_tokens']} steps; interquartile range of the paired ratios below.")
        else:
            cols[1].metric("Decode speedup", "—", help="Not measured for this setting yet, or every measurement was flagged.")
        cols[2].metric("Speedup bound", f"×{quality_now.bound:.2f}",
                       help="1/(1−s) for s = weight reads skipped: a memory-bound decoder cannot gain more.")
        spread = quality_now.chunk_ppl_increase
        cols[3].metric("Perplexity change", views.ppl_change(quality_now.ppl_increase), delta_color="off", delta_arrow="off",
                       delta=f"{quality_now.ppl_dense:.1f} → {quality_now.ppl_sparse:.1f}",
                       help=f"On {quality_now.held_out_tokens:,} held-out tokens the thresholds never saw; across its "
                            f"{len(spread)} chunks the change ranged {views.ppl_change(min(spread))} to {views.ppl_change(max(spread))}.")
        cols[4].metric("Top-1 agreement", f"{quality_now.top1_agreement:.0%}", delta=f"KL {quality_now.kl:.3f} nats",
                       delta_color="off", delta_arrow="off",
                       help="How often the sparse model's most likely next token is the dense model's, on the same text.")
        st.markdown(views.headline_sentence(quality_now, speed))
        st.caption(f"Quality measured with {quality_now.protocol_label}."
                   + (f" {views.speed_provenance(speed)}" if speed else "")
                   + (" This generation's “Sparse prefill” thresholds the prompt too, which costs more: the Quality "
                      "page's all-sparse protocol measures that." if current.sparse_prefill else ""))
        if flagged is not None:
            st.warning(f"The last decode measurement of this setting is not shown as a result: {flagged['flag']}."
                       + (" The speedup above is the last valid one." if speed else ""))
        if speed is None and not timing and st.button("Measure decode speed", key="measure_headline",
                                       help="Times dense and sparse decoding of this setting, interleaved; the "
                                            "progress bar estimates the time left."):
            with progress("Timing dense and sparse decoding…") as update:
                measure_decode(current, progress=update)
            st.rerun()


def stale_note(asked: str, current: Selection, produced_by: str | None = None) -> None:
    """Say which setting produced a result (`produced_by`: as it ran, where that differs from what was `asked`),
    and mark it stale (never relabel it) when the sidebar has moved on."""
    produced_by = produced_by or asked
    if asked == current.label:
        st.caption(f"Produced by: {produced_by}.")
    else:
        st.warning(f"Stale: produced by {produced_by}; the sidebar now says {current.label}. Run it again for the current setting.")


def table_with_download(frame: pd.DataFrame, file_name: str, column_config: dict | None = None) -> None:
    st.dataframe(frame, hide_index=True, width="stretch", column_config=column_config)
    st.download_button("Download CSV", frame.to_csv(index=False), file_name=file_name, mime="text/csv", key=f"download-{file_name}")


def text_block(text: str, highlight_from: int | None = None) -> str:
    """Generated text as escaped HTML, the part from character `highlight_from` on marked."""
    if highlight_from is None:
        body = html.escape(text)
    else:
        body = html.escape(text[:highlight_from]) + f"<mark>{html.escape(text[highlight_from:])}</mark>"
    return f"<div class='generated' style='white-space: pre-wrap; min-height: 6em'>{body or '&nbsp;'}</div>"


def traced(held: lab.Lab, spec: SparsitySpec | None, ids: tuple[int, ...], layer: int,
           dense_prefix: int = 0) -> views.TokenTrace:
    """`ids` traced (Lab.trace: the first `dense_prefix` dense, the rest sparse). Only this visitor's latest trace is
    kept, in their session, so it is released with the session; reruns with the same inputs reuse it."""
    key = (*held.key, spec, ids, layer, dense_prefix)
    kept = st.session_state.get("trace")
    if kept is None or kept[0] != key:
        with foreground("tracing tokens for a heatmap", timed=False), st.spinner("Tracing the tokens…"):
            kept = (key, held.trace(spec, ids, layer, dense_prefix=dense_prefix))
        st.session_state.trace = kept
    return kept[1]
