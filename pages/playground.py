"""Playground: the same prompt through the dense and the sparse model, side by side, streamed token by token, with
the skipping drawn live as it happens."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

from pages import common, live
from sparse_core import figures, lab, views

RUNS = lab.RUNS
HEATMAP_CAPTION = ("Press Generate: a layer × token heatmap of the skipped share grows here, one column per decode step "
                   "(the prompt's prefill, which makes the first token, is not counted).")


def _use_preset() -> None:
    st.session_state.prompt = common.PRESETS[st.session_state.preset]


def _generate(current: common.Selection, prompt_text: str, panes: dict, view: live.LiveView | None, notice):
    """Run the dense and the sparse stream side by side (Lab.compare): the text panes update every token, the live
    view between forward passes (never inside the timed ones). The comparison is kept in the session before the
    compile and fills token by token, so a Stop at any point finds what it made. What it waits for first (a compile)
    shows in `notice`, under the Generate button."""
    try:
        result = current.lab.compare(prompt_text, current.spec, current.method, current.name, current.label,
                                     current.max_new_tokens, current.temperature, current.seed, current.compiled,
                                     current.sparse_prefill)
    except lab.GenerationError as err:
        st.error(str(err))
        return None
    st.session_state.generation = result
    with common.foreground("a visitor's generation", notice, left=result.seconds_left):
        estimate = result.compile_wait()
        if estimate is not None:  # why a run then decodes uncompiled, if one does, comes with its first token
            with notice.container(), st.spinner(f"Compiling the decode steps ({estimate}). Stop takes effect once "
                                                "the compile in progress ends…", show_time=True):
                result.compile()
        def show(run: str) -> None:
            panes[run]["text"].markdown(common.text_block(result.text(run)), unsafe_allow_html=True)

        def reading(run: str, done: int, total: int) -> None:
            if total > lab.PREFILL_CHUNK:  # a long prompt: its prefill takes a while, said as it goes
                panes[run]["text"].progress(done / total, text=f"Reading the prompt: {done:,} of {total:,} tokens…")
        result.run(on_token=show, on_round=(lambda: view.update(result)) if view is not None else lambda: None,
                   on_prefill=reading)
    return result


def _fill_panes(result, panes: dict) -> None:
    divergence = result.divergence
    rates = result.rates
    for run in RUNS:
        highlight = result.divergence_chars if run == "sparse" else None
        panes[run]["text"].markdown(common.text_block(result.text(run), highlight), unsafe_allow_html=True)
        if rates is None:
            panes[run]["rate"].caption("Fewer than two tokens: no decode step to time.")
            continue
        delta = {}
        if run == "sparse":
            delta = common.speedup_delta(rates.speedup) if not result.flag else dict(
                delta=f"ratio flagged: {result.flag.split(':')[0]}", delta_color="gray", delta_arrow="off")
        panes[run]["rate"].metric(f"{run.capitalize()} tokens/s", f"{getattr(rates, run):.1f}", **delta,
                                  help=f"1 / the median time of the {rates.steps} decode steps both runs made (the "
                                       "prompt's prefill left out), so both sides compare the same steps.")
    if result.flag:
        st.warning(f"This generation's speed ratio is not a result: {result.flag}. The headline's decode measurement "
                   "times the setting properly.")
    if result.partial:
        st.warning(f"Partial result: the run was stopped after {len(result.tokens['sparse'])} sparse and "
                   f"{len(result.tokens['dense'])} dense tokens.")
    made = min(len(result.tokens[run]) for run in RUNS)
    if divergence is None and made == 0:
        st.info("The sparse run was stopped before its first token: nothing to compare.")
    elif divergence is None:
        st.success(f"The sparse run produced the same {made} token{'s' if made != 1 else ''} as dense"
                   + (" (as far as both got)." if result.partial else "."))
    else:
        dense_token, sparse_token = (result.wrote(run, divergence) for run in RUNS)
        st.warning(f"The outputs diverge at generated token {divergence + 1}: dense wrote {dense_token}, sparse wrote "
                   f"{sparse_token}; the sparse text is highlighted from there on. After a divergence the two "
                   f"continue from different text, so later differences are expected.")
    lengths = {run: len(result.tokens[run]) for run in RUNS}
    if lengths["dense"] != lengths["sparse"] and rates is not None:
        st.caption(f"Dense made {lengths['dense']} token{'s' if lengths['dense'] != 1 else ''} and sparse "
                   f"{lengths['sparse']}; their rates compare the "
                   f"first {rates.steps} decode steps of each.")


def _report(result) -> str:
    """The result's report (Lab.report), or "" with one sentence on the page when it cannot be built."""
    try:
        return result.lab.report(result)
    except Exception as err:  # noqa: BLE001 - a report that fails must not take the generation with it
        st.error(f"The report could not be built ({type(err).__name__}: {err}).")
        return ""


def _neuron_view(result) -> None:
    """After the run: one layer's MLP neurons over the prompt and the generated tokens, right under the heatmap."""
    model = result.model
    layer = st.slider("Layer for the neuron view", 0, model.num_layers - 1, model.num_layers // 2, key="playground_layer")
    trace = common.traced(result.lab, result.spec, result.ids(), layer,
                          0 if result.sparse_prefill else len(result.prompt.ids))
    neurons = views.neuron_view(trace, hot_first=True)
    st.plotly_chart(figures.neuron_heatmap(neurons, trace.tokens, height=440), width="stretch", key="playground_neurons")
    prompt = "the prompt ran sparse too (sparse prefill)" if result.sparse_prefill else "the prompt's tokens ran dense (the prefill)"
    st.caption(f"MLP neurons of layer {layer}, the most often active at the top; grey = skipped; {prompt}. The "
               "Heatmaps page has the |x| histograms and more views.")


def _show_details(result) -> None:
    token = result.cost
    st.subheader("What this generation skipped")
    chart = px.bar(result.per_layer, x="layer", y="skipped", hover_data=["attn_in", "attn_out", "mlp_in", "mlp_mid"],
                   labels={"skipped": "share of the layer's weight reads skipped"})
    chart.update_layout(height=320, margin=dict(t=30, b=10), yaxis_tickformat=".0%")
    st.plotly_chart(chart, width="stretch")
    st.caption(f"Per decoder layer, the share of its weight reads the sparse run's decode steps skipped ({result.name}; "
               f"the prompt's {'sparse' if result.sparse_prefill else 'dense'} prefill is not counted); over the whole "
               f"model, embeddings, norms and output head included, this generation skipped "
               f"{token.reads_skipped:.1%} of the weight reads. Active kernel backend: " + lab.describe_backends())

    st.subheader("Cost of one generated token")
    st.caption("What one decode step of this generation reads and computes, from its counted skips (the prefill that "
               "makes the first token is not counted).")
    st.metric("Bound for this generation's weight reads", f"×{token.bound:.2f}",
              help="Decoding one token at batch 1 reads every weight once and is limited by memory bandwidth, so "
                   "the best possible speedup is the dense weight bytes divided by the sparse ones, 1/(1−s).")
    amount = st.column_config.NumberColumn(format="compact")
    common.table_with_download(token.frame(), "token_cost.csv", {"dense": amount, "sparse": amount,
                                                                  "saved": st.column_config.NumberColumn(format="percent")})
    st.caption(f"Energy is an estimate, not a measurement: it assumes about {token.pj_per_byte:.0f} pJ per byte "
               "moved from DRAM (an order-of-magnitude figure; older DDR memory costs several times more) and leaves "
               "arithmetic and caches out. Multiply-adds count one per weight read; attention over the context is not included.")


st.title("Playground")
st.caption("Most inputs to a language model's weight matrices are close to zero at any given token. Activation "
           "sparsity skips the weights those inputs would multiply: a **threshold** decides, per input, whether it is "
           "small enough to skip. Fewer weights read means faster decoding, but every skipped input slightly changes "
           "the answer, so the quality cost is always shown next to the speed.")
current = common.current()
if current.spec is None:
    st.stop()
common.headline(current)

st.selectbox("Preset", list(common.PRESETS), index=None, key="preset", on_change=_use_preset, placeholder="Pick a preset prompt…")
st.session_state.setdefault("prompt", common.PRESETS["Chat question"])  # a preset writes it: no second default
prompt_text = st.text_area("Prompt", key="prompt", height=100)
buttons = st.columns([1, 1, 3])
clicked = buttons[0].button("Generate", type="primary")
buttons[1].button("Stop", key="stop", help="Stops a running generation; what it made so far is kept, marked partial.")
notice = st.empty()  # what a Generate waits for before its first token, right under the button
live_on = buttons[2].toggle("Live charts", value=True, key="live_charts",
                            help="Draw the heatmap and the running rates while tokens stream (redrawn at most every "
                                 f"{live.DRAW_EVERY_S * 1000:.0f} ms, between forward passes). Off: drawn once at the end.")
result = st.session_state.get("generation")
columns = dict(zip(RUNS, st.columns(2, border=True)))
panes = {}
for run, column in columns.items():
    with column:
        shown = current.name if clicked or result is None else result.name
        stale = "" if shown == current.name else f" (stale: the sidebar now says {current.name})"
        st.markdown(f"**{run.capitalize()}**" + ("" if run == "dense" else f" · {shown}{stale}"))
        panes[run] = {"rate": st.empty(), "text": st.empty()}
        panes[run]["text"].caption("Press Generate to compare.")
st.subheader("Live: where the sparse run skips, token by token")
view = live.LiveView()
if clicked:
    fresh = _generate(current, prompt_text, panes, view if live_on else None, notice)
    if fresh is not None:
        result = fresh
if result is None:
    view.chart.caption(HEATMAP_CAPTION)
elif not result.tokens["sparse"] and not result.tokens["dense"]:
    view.chart.caption(HEATMAP_CAPTION)
    st.warning("Stopped before the first token, while the generation waited for a compile; the compile that was "
               "running finished and is kept, so the next Generate starts sooner." if result.stage == "compiling" else
               "Stopped before the first token.")
else:
    if result.decoded_texts():
        view.update(result, final=True)
    else:
        view.strip(result)
        view.chart.caption("The sparse run made no decode step (its one token comes from the prompt's prefill, "
                           "which is not counted): no column to draw.")
    common.stale_note(result.label, current, result.produced_by)
    for note in result.notes:
        st.warning(note)
    if result.report is None:  # built once, in the page run: a file built on click could be lost (CI lost some)
        with common.foreground("building a report", timed=False), st.spinner("Building the report…"):
            result.report = _report(result)
    st.download_button("Download report", result.report or "", file_name="sparsity-lab-report.html", mime="text/html",
                       key="download_report", on_click="ignore", disabled=not result.report,
                       help="One HTML file that opens offline: the setting, the headline numbers, both texts with the "
                            "divergence marked, the charts with the bound, and this machine.")
    _fill_panes(result, panes)
    _neuron_view(result)
    _show_details(result)
