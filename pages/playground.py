"""Playground: the same prompt through the dense and the sparse model, side by side, streamed token by token."""
from __future__ import annotations

import dataclasses

import plotly.express as px
import streamlit as st

from pages import common
from sparse_core import cost, generate, models, ops, report
from sparse_core.spec import SparsitySpec
from sparse_core.trace import SparsityCounter

RUNS = ("dense", "sparse")


@dataclasses.dataclass
class Result:
    """One Generate click: both runs' tokens and what the sparse run skipped, with the setting that produced them.
    Kept in session state for the Heatmaps page and so the panes survive reruns."""
    model: models.SparseModel
    prompt: generate.Prompt
    tokens: dict[str, list[generate.Token]]
    spec: SparsitySpec
    method: str
    name: str      # Settings.name at generation time
    setting: str   # Settings.setting at generation time
    achieved: float  # share of the sparsifiable weight reads skipped (SparsityCounter.weighted)
    per_layer: object  # pandas DataFrame from report.per_layer_frame

    def text(self, run: str) -> str:
        return "".join(t.text for t in self.tokens[run])

    @property
    def rates(self) -> generate.PairedRates | None:
        return generate.paired_rates(self.tokens["dense"], self.tokens["sparse"])

    @property
    def divergence(self) -> int | None:
        return generate.first_divergence(self.tokens["dense"], self.tokens["sparse"])


def _use_preset() -> None:
    st.session_state.prompt = common.PRESETS[st.session_state.preset]


def _generate(current: common.Settings, prompt_text: str, panes: dict) -> Result | None:
    """Interleave the dense and the sparse stream one token at a time, each pane updating live. Both runs carry a
    SparsityCounter, so observer overhead is the same on both sides of the speed comparison."""
    model = current.model
    try:
        prompt = generate.encode_prompt(model, prompt_text, max_new_tokens=current.max_new_tokens)
    except generate.GenerationError as err:
        st.error(str(err))
        return None
    counters = {run: SparsityCounter() for run in RUNS}
    streams = {run: generate.stream(model, prompt, spec, current.max_new_tokens, current.temperature, current.seed,
                                    observers=(counters[run],))
               for run, spec in zip(RUNS, (None, current.spec))}
    tokens = {run: [] for run in RUNS}
    while streams:
        for run in list(streams):
            token = next(streams[run], None)
            if token is None:
                del streams[run]
                continue
            tokens[run].append(token)
            panes[run]["text"].markdown(common.text_block("".join(t.text for t in tokens[run])), unsafe_allow_html=True)
    skippable = model.skippable_params(current.method)
    return Result(model, prompt, tokens, current.spec, current.method, current.name, current.setting,
                  counters["sparse"].weighted(skippable), report.per_layer_frame(model, counters["sparse"], current.method))


def _fill_panes(result: Result, panes: dict) -> None:
    divergence = result.divergence
    rates = result.rates
    for run in RUNS:
        highlight = None
        if run == "sparse" and divergence is not None:
            highlight = len("".join(t.text for t in result.tokens[run][:divergence]))
        panes[run]["text"].markdown(common.text_block(result.text(run), highlight), unsafe_allow_html=True)
        if rates is None:
            panes[run]["rate"].caption("One token: no decode step to time.")
            continue
        delta = common.speedup_delta(rates.speedup) if run == "sparse" else {}
        panes[run]["rate"].metric(f"{run.capitalize()} tokens/s", f"{getattr(rates, run):.1f}", **delta,
                                  help=f"1 / the median time of the {rates.steps} decode steps both runs made (the "
                                       "prompt's prefill left out), so both sides compare the same steps.")
    if divergence is None:
        st.success(f"The sparse run produced the same {len(result.tokens['sparse'])} tokens as dense.")
    else:
        dense_token, sparse_token = (result.tokens[run][divergence].text for run in RUNS)
        st.warning(f"The outputs diverge at generated token {divergence + 1}: dense wrote {dense_token!r}, sparse wrote "
                   f"{sparse_token!r}; the sparse text is highlighted from there on. After a divergence the two "
                   f"continue from different text, so later differences are expected.")
    lengths = {run: len(result.tokens[run]) for run in RUNS}
    if lengths["dense"] != lengths["sparse"] and rates is not None:
        st.caption(f"Dense made {lengths['dense']} tokens and sparse {lengths['sparse']} (one stopped at its end-of-text "
                   f"token); their rates compare the first {rates.steps} decode steps of each.")


def _show_details(result: Result) -> None:
    token = cost.token_cost(result.model, result.achieved)
    st.subheader("What this generation skipped")
    chart = px.bar(result.per_layer, x="layer", y="skipped", hover_data=["attn_in", "attn_out", "mlp_in", "mlp_mid"],
                   labels={"skipped": "share of the layer's weight reads skipped"})
    chart.update_layout(height=320, margin=dict(t=30, b=10), yaxis_tickformat=".0%")
    st.plotly_chart(chart, width="stretch")
    st.caption(f"Per decoder layer, the share of its weight reads the sparse run skipped ({result.name}); over the whole "
               f"model, embeddings, norms and output head included, this generation skipped "
               f"{token.reads_skipped:.1%} of the weight reads. Active kernel backend: " + ops.describe_backends())

    st.subheader("Cost of one generated token")
    st.metric("Bound for this generation's weight reads", f"×{token.bound:.2f}",
              help="Decoding one token at batch 1 reads every weight once and is limited by memory bandwidth, so "
                   "the best possible speedup is the dense weight bytes divided by the sparse ones, 1/(1−s).")
    amount = st.column_config.NumberColumn(format="compact")
    common.table_with_download(token.frame(), "token_cost.csv", {"dense": amount, "sparse": amount,
                                                                  "saved": st.column_config.NumberColumn(format="percent")})
    st.caption(f"Energy is an estimate, not a measurement: it assumes about {cost.DRAM_PJ_PER_BYTE:.0f} pJ per byte "
               "moved from DRAM (an order-of-magnitude figure; older DDR memory costs several times more) and leaves "
               "arithmetic and caches out. Multiply-adds count one per weight read; attention over the context is not included.")


current = common.sidebar()
st.title("Playground")
st.caption("Most inputs to a language model's weight matrices are close to zero at any given token. Activation "
           "sparsity skips the weights those inputs would multiply: a **threshold** decides, per input, whether it is "
           "small enough to skip. Fewer weights read means faster decoding, but every skipped input slightly changes "
           "the answer, so the quality cost is always shown next to the speed.")
if current.spec is None:
    st.stop()
common.headline(current)

st.selectbox("Preset", list(common.PRESETS), index=None, key="preset", on_change=_use_preset, placeholder="Pick a preset prompt…")
prompt_text = st.text_area("Prompt", common.PRESETS["Chat question"], key="prompt", height=100)
clicked = st.button("Generate", type="primary")
result = st.session_state.get("generation")
columns = dict(zip(RUNS, st.columns(2, border=True)))
panes = {}
for run, column in columns.items():
    with column:
        shown = current.name if clicked or result is None else result.name
        st.markdown(f"**{run.capitalize()}**" + ("" if run == "dense" else f" · {shown}"))
        panes[run] = {"rate": st.empty(), "text": st.empty()}
        panes[run]["text"].caption("Press Generate to compare.")
if clicked:
    fresh = _generate(current, prompt_text, panes)
    if fresh is not None:
        st.session_state.generation = result = fresh
if result is not None:
    common.stale_note(result.setting, current)
    _fill_panes(result, panes)
    _show_details(result)
