"""What every page shares: the model (one per name and dtype, shared by all visitors), calibrated specs and their
quality cost (cached per model, method and target), the settings sidebar, and small rendering helpers.

Not registered in app.py's navigation, so it never shows as a page.
"""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import pandas as pd
import streamlit as st

from sparse_core import calibrate, metrics, models, report
from sparse_core.spec import SparsitySpec, SpecError

METHODS = {"TEAL thresholds": "teal", "CATS gate": "cats", "top-k": "topk"}
METHOD_HELP = ("TEAL skips every projection input whose magnitude is below a calibrated threshold. "
               "CATS thresholds only the gated MLP's intermediate (and skips those neurons' weights in down, and in "
               "up too with the cats weight layout). "
               "Top-k keeps the largest inputs of each token; it needs no calibration.")
DEFAULTS = dict(model_name=models.DEFAULT_MODEL, dtype="float32", layout="inputs", method_label="TEAL thresholds", target=0.25,
                max_new_tokens=48, sample=False, temperature=0.8, seed=0, trust_remote_code=False)
# Prompts covering what people use LLMs for; the chat template is applied by generate.encode_prompt.
PRESETS = {
    "Chat question": "What is the capital of France, and what is it famous for?",
    "Translation": "Translate into French: The weather is lovely today, so we are going to the beach.",
    "Sentiment": "Is the sentiment of this review positive or negative? \"The battery died after two days and support never answered.\"",
    "Summarisation": ("Summarise in one sentence: The city council met on Tuesday to discuss the new bike lanes. "
                      "Residents praised the safer routes to school, while shop owners worried about losing parking spaces. "
                      "The council agreed to a six-month trial on two streets."),
    "A story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
LOGO = Path(__file__).resolve().parent.parent / "assets" / "logo.svg"
MAX_SHARED_SPECS = 256  # calibrated specs kept in memory for all visitors (each is a few KB)
QUALITY_TOKENS = 256  # held-out tokens the quality cost is measured on: enough to rank settings, a few seconds


@dataclasses.dataclass(frozen=True)
class Settings:
    """One visitor's choices from the sidebar, plus the model and spec they resolve to (spec None: unusable)."""
    model: models.SparseModel
    method: str
    target: float
    spec: SparsitySpec | None
    max_new_tokens: int
    temperature: float
    seed: int

    @property
    def method_label(self) -> str:
        return next(label for label, key in METHODS.items() if key == self.method)


LAYOUT_HELP = {"inputs": "Every projection stores each input's weights contiguously: TEAL and top-k skip reads in all "
                          "seven projections; CATS skips only down's.",
               "cats": "up_proj keeps its rows: CATS also skips the up rows of inactive neurons; TEAL and top-k then "
                       "read all of up."}


@st.cache_resource(show_spinner="Loading the model…", max_entries=3)
def load_model(name: str, dtype: str, layout: str = "inputs", trust_remote_code: bool = False) -> models.SparseModel:
    return models.load(name, dtype=dtype, trust_remote_code=trust_remote_code, layout=layout)


@st.cache_resource(show_spinner=False)
def _calibrated_specs() -> dict[tuple, SparsitySpec]:
    """Specs shared by every visitor, keyed by model, dtype, method and target. A plain store rather than a cached
    function, because calibration reports progress to a bar on the page and cached functions replay their output."""
    return {}


@st.cache_data(show_spinner="Measuring the quality cost on held-out text…", max_entries=64)
def quality(_model: models.SparseModel, model_key: tuple, spec: SparsitySpec) -> dict:
    """Perplexity, KL and top-1 agreement of `spec` against dense on a short slice of the evaluation text."""
    return metrics.evaluate(_model, spec, max_tokens=QUALITY_TOKENS).as_dict()


def model_key(model: models.SparseModel) -> tuple:
    return model.name, str(model.dtype), model.layout, model.fingerprint


def spec_for(model: models.SparseModel, method: str, target: float) -> SparsitySpec:
    """The calibrated spec for this setting; computed with a progress bar on first use, then shared."""
    key = (*model_key(model), method, round(target, 4))
    store = _calibrated_specs()
    if key not in store:
        label = f"Calibrating {method.upper()} thresholds for {target:.0%} sparsity on the calibration text (first use only)…"
        bar = st.progress(0.0, text=label)
        spec = calibrate.calibrate(model, method, target, progress=lambda done, total: bar.progress(done / total, text=label))
        bar.empty()
        if len(store) >= MAX_SHARED_SPECS:
            store.pop(next(iter(store), None), None)  # the oldest (on disk: back in milliseconds); races are harmless
        store[key] = spec
        return spec
    return store.get(key) or spec_for(model, method, target)  # evicted by another visitor meanwhile: recalibrate


def _resolve_model(name: str, dtype: str, layout: str, trust_remote_code: bool) -> models.SparseModel:
    """The requested model, or (with a one-sentence error) the last one that loaded, so the page keeps working."""
    name = name.strip() or models.DEFAULT_MODEL
    try:
        model = load_model(name, dtype, layout, trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a user-typed id can fail in many ways; each becomes one sentence
        message = str(err) if isinstance(err, models.ModelLoadError) else f"Could not load model {name!r} ({type(err).__name__}: {err})."
        st.sidebar.error(message)
        fallback = st.session_state.get("last_loaded", (models.DEFAULT_MODEL, "float32", "inputs"))
        if fallback == (name, dtype, layout):
            st.stop()
        st.sidebar.caption(f"Still using {fallback[0]} ({fallback[1]}).")
        return load_model(*fallback)
    st.session_state.last_loaded = (name, dtype, layout)
    return model


def sidebar() -> Settings:
    """Draw the settings (same keys on every page) and resolve them to a model and a spec."""
    for key, value in DEFAULTS.items():  # re-assigned every run: keeps each choice when the visitor changes page
        st.session_state[key] = st.session_state.get(key, value)
    st.logo(str(LOGO), size="large")
    with st.sidebar:
        st.header("Model")
        name = st.text_input("Model", key="model_name", label_visibility="collapsed",
                             help="The embedded default, a Hugging Face id (safetensors weights) or a local folder.")
        dtype = st.selectbox("Weights", ["float32", "bfloat16"], key="dtype")
        layout = st.selectbox("Weight layout", list(LAYOUT_HELP), key="layout",
                              help="How the model's one copy of the weights is stored for the kernels; each layout "
                                   "in use is its own model in memory, shared by all visitors. " + " ".join(
                                  f"{choice}: {text}" for choice, text in LAYOUT_HELP.items()))
        trust = st.toggle("Run the model's own code (trust_remote_code)", key="trust_remote_code",
                          help="Off by default. Only for models whose repository ships Python code you have read and "
                               "trust: it runs on this machine with your permissions.")
        model = _resolve_model(name, dtype, layout, trust)
        st.caption(f"{model.num_layers} layers, {'gated' if model.gated else 'plain'} MLP")

        st.header("Sparsity")
        method = METHODS[st.radio("Method", list(METHODS), key="method_label", help=METHOD_HELP)]
        target = st.slider("Share of inputs skipped", 0.0, 0.9, step=0.05, key="target",
                           help="Small models tolerate less: on SmolLM2-135M, TEAL costs about +2 % perplexity at 25 %, "
                                "+22 % at 40 % and +81 % at 50 %.")
        st.header("Generation")
        max_new_tokens = st.slider("Max new tokens", 1, 256, key="max_new_tokens")
        sample = st.toggle("Sample (otherwise greedy)", key="sample")
        temperature = st.slider("Temperature", 0.1, 2.0, step=0.1, key="temperature") if sample else 0.0
        seed = int(st.number_input("Seed", 0, 2**31 - 1, key="seed")) if sample else 0
    applied = st.session_state.get("applied_spec")
    use_applied = applied is not None and applied[1].model_fingerprint == model.fingerprint and st.sidebar.toggle(
        f"Use the Tuner's spec “{applied[0]}”", value=True, key="use_applied",
        help="Generate with the spec applied on the Tuner page instead of the method and slider above.")
    try:
        spec = applied[1] if use_applied else spec_for(model, method, target)
        model.check(spec)
    except SpecError as err:
        st.error(str(err))
        spec = None
    if use_applied:
        method = spec.method
    return Settings(model, method, target, spec, max_new_tokens, temperature, seed)


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


def quality_row(current: Settings) -> None:
    """What the current setting costs in quality and what it can gain at most: shown beside every speed number."""
    result = quality(current.model, model_key(current.model), current.spec)
    increase = result["ppl_sparse"] / result["ppl_dense"] - 1.0
    bound = report.token_cost(current.model, result["achieved_sparsity"]).bound
    cols = st.columns(4)
    cols[0].metric("Skipped (held-out text)", f"{result['achieved_sparsity']:.0%}", help="Share of weight reads skipped, measured.")
    cols[1].metric("Perplexity", f"{result['ppl_sparse']:.1f}", f"{increase:+.1%} vs dense {result['ppl_dense']:.1f}",
                   delta_color="inverse", help="How surprised the model is by held-out text; lower is better.")
    cols[2].metric("Top-1 agreement", f"{result['top1_agreement']:.0%}", help="How often the sparse model's most likely next token is the dense model's.")
    cols[3].metric("Speedup bound", f"×{bound:.2f}", help="Decoding one token reads every weight once, so skipping weight reads can at most "
                                                           "speed it up by dense bytes / sparse bytes.")


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


def traced(model: models.SparseModel, spec: SparsitySpec | None, ids: tuple[int, ...], layer: int) -> report.TokenTrace:
    """One sparse forward pass over `ids` with a Trace. Only this visitor's latest trace is kept, in their session,
    so it is released with the session; reruns with the same inputs reuse it."""
    key = (*model_key(model), spec, ids, layer)
    held = st.session_state.get("trace")
    if held is None or held[0] != key:
        with st.spinner("Tracing the tokens…"):
            held = (key, report.trace_tokens(model, spec, ids, layer))
        st.session_state.trace = held
    return held[1]
