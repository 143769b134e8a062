"""Speedup: does skipping inputs turn into time saved? Kernel, per-layer and end-to-end measurements, each against
the fastest dense product measured in the same run, each next to its bound, flagged when it cannot be trusted."""
import pandas as pd
import plotly.express as px
import streamlit as st

from pages import common
from sparse_core import figures, lab


def _kernel_chart(kernels: pd.DataFrame) -> None:
    """Valid rows as lines against the bound; flagged rows only as grey crosses, never as points of a line."""
    kernels = kernels.assign(shape=kernels["out_features"].astype(str) + "×" + kernels["in_features"].astype(str))
    valid = kernels[kernels["flag"].isna()]
    figure = px.line(valid, x="sparsity", y="speedup", color="shape", facet_col="dtype", markers=True,
                     category_orders={"dtype": sorted(kernels["dtype"].unique())}, labels={"speedup": "speedup vs fastest dense"})
    bound = kernels.drop_duplicates("sparsity").sort_values("sparsity")
    flagged = kernels[kernels["flag"].notna()]
    for column, dtype in enumerate(sorted(kernels["dtype"].unique()), start=1):
        figure.add_scatter(x=bound["sparsity"], y=bound["bound"], mode="lines", name="bound 1/(1−s)",
                           line=dict(color="#6b7280", dash="dash"), showlegend=column == 1, row=1, col=column)
        mine = flagged[flagged["dtype"] == dtype]
        if len(mine):
            figure.add_scatter(x=mine["sparsity"], y=mine["speedup"], mode="markers", name="flagged: not a result",
                               marker=dict(symbol="x", color="#9ca3af", size=10), text=mine["shape"] + ": " + mine["flag"],
                               hovertemplate="%{text}<extra></extra>", showlegend=column == 1, row=1, col=column)
    figure.update_layout(height=400, margin=figures.TITLED_MARGIN)
    st.plotly_chart(figure, width="stretch", key="kernel_chart")
    bandwidth = kernels["bandwidth_gbs"].iloc[0]
    reads = valid.melt(id_vars=["shape", "dtype", "sparsity"], value_vars=["dense_gbs", "sparse_gbs"], var_name="run",
                       value_name="GB/s").replace({"dense_gbs": "dense", "sparse_gbs": "sparse"})
    figure = px.line(reads, x="sparsity", y="GB/s", color="shape", line_dash="run", facet_col="dtype", markers=True,
                     category_orders={"dtype": sorted(kernels["dtype"].unique())},
                     labels={"GB/s": "weight bytes read / s (GB/s)"})
    figure.add_shape(type="line", xref="paper", x0=0, x1=1, y0=bandwidth, y1=bandwidth,  # drawn with no valid row too
                     line=dict(color="#111827", dash="dot"))
    figure.add_annotation(xref="paper", x=0, y=bandwidth, text=f"read bandwidth probed in this run: {bandwidth:.0f} GB/s",
                          showarrow=False, xanchor="left", yshift=10)
    figure.update_yaxes(rangemode="tozero")
    figure.update_layout(height=360, margin=figures.TITLED_MARGIN)
    st.plotly_chart(figure, width="stretch", key="kernel_bandwidth_chart")
    st.caption("Achieved read rate of the weight bytes each product needs (sparse: only the kept rows), against the "
               "machine's read bandwidth measured in the same run: how close each is to the memory limit.")
    if len(flagged):
        st.warning(f"{len(flagged)} of {len(kernels)} rows are flagged and drawn as grey crosses, not as results: "
                   + "; ".join(sorted(set(flagged["flag"].str.split(":").str[0]))) + ". Run again on a quieter machine.")


st.title("Speedup")
st.caption("Decoding one token at a time is limited by how fast the weights stream from memory, so skipping a share "
           "s of the weight reads can at best make it 1/(1−s) times faster: that is the **bound** drawn on every "
           "chart. Every speedup is over the fastest dense product measured in the same run (HF's own layout, "
           "F.linear on the stored rows, or the kernel with nothing skipped), with its spread; one above 1.05 × its "
           f"bound or with a wide spread is flagged, not shown as a result. Active backend: {lab.describe_backends()}.")
current = common.current()
if current.method == "cats" and current.model.layout == "inputs":
    st.caption("CATS in the **inputs** weight layout skips only the down projection's reads; pick the **cats** "
               "layout in the sidebar to skip the up rows of inactive neurons too.")

st.subheader("Kernel: one linear layer at batch 1")
shape_names = {f"{o}×{i}": (o, i) for o, i in lab.KERNEL_SHAPES}
left, middle, right = st.columns([2, 1, 1])
shapes = left.multiselect("Weight shapes (out × in)", list(shape_names), default=list(shape_names), key="bench_shapes")
dtypes = middle.multiselect("Dtypes", list(lab.KERNEL_DTYPES), default=list(lab.KERNEL_DTYPES), key="bench_dtypes")
full = right.toggle("Full run", key="bench_full",
                    help=f"On: {len(lab.KERNEL_SPARSITIES)} sparsities, {lab.FULL_REPEATS} repeats. Off: the quick run, "
                         f"{len(lab.QUICK_KERNEL_SPARSITIES)} sparsities and {lab.QUICK_REPEATS} repeats.")
if st.button("Run kernel benchmark", type="primary", disabled=not (shapes and dtypes)):
    with common.foreground("the kernel benchmark", rank=lab.JOB), common.progress("Timing dense vs sparse kernels…") as update:
        rows = lab.kernel_benchmark([shape_names[s] for s in shapes], dtypes, quick=not full,
                                    device=current.model.device.type, progress=update)
    st.session_state.kernel_rows = pd.DataFrame(rows)
kernels = st.session_state.get("kernel_rows")
if kernels is not None:
    _kernel_chart(kernels)
    st.caption(f"Random inputs and weights on {current.model.device.type}; the sidebar's setting plays no part here.")
    common.table_with_download(kernels, "kernel_benchmark.csv")

st.subheader("One decode step, layer by layer")
st.caption("Wall time of each decoder layer while generating a few tokens, dense vs the current sidebar setting "
           "(median over the steps; the first step, which reads the whole prompt, is left out).")
if current.spec is not None and st.button("Time the layers", key="time_layers"):
    with common.foreground("timing the layers", rank=lab.JOB), st.status("Timing decode steps dense and sparse, interleaved…") as status:
        st.session_state.layer_times = (current.lab.layer_times(current.spec), current.label)
        status.update(label="Decode steps timed", state="complete")
if st.session_state.get("layer_times") is not None:
    breakdown, produced_by = st.session_state.layer_times
    common.stale_note(produced_by, current)
    totals = breakdown.frame[["dense_ms", "sparse_ms"]].sum()
    if breakdown.flag:
        st.warning(f"This layer timing is not a result: {breakdown.flag}. Time it again with nothing else running; "
                   "the table keeps the raw figures.")
    else:
        long = breakdown.frame.melt(id_vars="part", value_vars=["dense_ms", "sparse_ms"], var_name="run", value_name="ms")
        figure = px.bar(long, x="part", y="ms", color="run", barmode="group", labels={"part": "", "ms": "ms per step"})
        figure.update_layout(height=340, margin=dict(t=30, b=10))
        st.plotly_chart(figure, width="stretch", key="layer_chart")
        st.caption(f"Whole step: {totals['dense_ms']:.1f} ms dense, {totals['sparse_ms']:.1f} ms sparse "
                   f"(×{breakdown.speedup:.2f}, bound ×{breakdown.bound:.2f}); medians of {breakdown.rounds} interleaved runs of {breakdown.steps} steps.")
    common.table_with_download(breakdown.frame, "decode_step_layers.csv")

st.subheader("End to end: tokens per second")
st.caption(f"Greedy decoding of one prompt, {lab.DECODE_TOKENS} steps, {lab.DECODE_REPEATS} interleaved runs of each "
           "dense candidate and of the current setting. This is the setting's one speed measurement: the Playground's "
           "headline shows the same figures.")
if current.spec is not None and st.button("Measure tokens/s", key="e2e"):
    with common.progress("Decoding dense and sparse…") as update:
        common.measure_decode(current, progress=update)
decode = None if current.spec is None else current.lab.decode_speed(current.spec, current.compiled)
flagged = None if current.spec is None else current.lab.flagged_decode(current.spec, current.compiled)
if flagged is not None:
    st.warning(f"The last measurement of this setting is not a result: {flagged['flag']}. Measure again with nothing "
               "else running" + ("; below is the last valid one." if decode else "."))
if decode is None:
    if flagged is None:
        st.info("Not measured for this setting yet: press “Measure tokens/s”.")
else:
    cols = st.columns(4)
    cols[0].metric("Dense tokens/s", f"{decode['dense_tok_s']:.1f}",
                   help=f"The fastest dense path measured ({decode['dense_path']}); all candidates: {decode['dense_candidates_tok_s']}. "
                        f"Interquartile range {decode['dense_tok_s_iqr'][0]:.1f}–{decode['dense_tok_s_iqr'][1]:.1f}.")
    cols[1].metric("Sparse tokens/s", f"{decode['sparse_tok_s']:.1f}",
                   help=f"Interquartile range {decode['sparse_tok_s_iqr'][0]:.1f}–{decode['sparse_tok_s_iqr'][1]:.1f}.")
    cols[2].metric("Speedup", f"×{decode['speedup']:.2f}", **common.speedup_delta(decode["speedup"]),
                   help=f"Interquartile range of the paired ratios ×{decode['speedup_iqr'][0]:.2f}–×{decode['speedup_iqr'][1]:.2f}.")
    setting = current.lab.stored_quality(current.spec)  # the setting's one bound, as the headline shows it
    cols[3].metric("Speedup bound", f"×{(setting.bound if setting else decode['bound']):.2f}",
                   help="Dense weight bytes per token over sparse ones for the share of weight reads this setting "
                        "skips on the held-out tokens (the headline's figure); this timing's own decode steps skipped "
                        f"{decode['weight_reads_skipped']:.1%} (bound ×{decode['bound']:.2f}), against which its "
                        "speedup is checked. The embedding lookup, norms and output head are read in full either way.")
    st.plotly_chart(figures.decode_speed_figure(decode), width="stretch", key="decode_chart")
    st.caption(f"The dotted lines are the memory-bandwidth limits: the read bandwidth probed beside this timing "
               f"({decode['bandwidth_gbs']:.0f} GB/s; the kernel chart's is probed in its own run) over the weight bytes per token ({decode['weight_bytes_per_token'] / 1e6:.0f} MB "
               f"dense, {decode['sparse_weight_bytes_per_token'] / 1e6:.0f} MB sparse, counted over the decode steps: the "
               f"prompt's prefill runs dense). Dense reaches "
               f"{decode['dense_fraction_of_limit']:.0%} of its limit, sparse {decode['sparse_fraction_of_limit']:.0%}; "
               "the rest is per-token overhead (docs/PERFORMANCE.md).")
    st.caption(f"Measured for {current.label} with the {decode['decoder']}: {decode['model']}, dense path "
               f"“{decode['dense_path']}”, plain HF {decode['plain_hf_tok_s'] or '—'} tok/s.")
if decode is not None or flagged is not None:
    rows = [row for row in (decode, flagged) if row is not None]
    common.table_with_download(pd.DataFrame([{k: (str(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()}
                                             for row in rows]), "decode_benchmark.csv")

st.subheader("Beside llama.cpp")
measured_peer = current.lab.peer()
if measured_peer is None:
    st.info("llama.cpp has not been measured on this machine: run `make peer` (builds it, about eight minutes), then "
            "`python -m sparse_core bench peer`. A sparse gain over a slow dense path is no gain: this is the decoder "
            "a user could run instead.")
else:
    peer_caption, peer_table = measured_peer
    st.caption(peer_caption + " “× llama.cpp” compares each lab rate with llama.cpp at the same precision; "
               "“× lab dense” is TEAL over the lab's own fastest dense, beside its bound.")
    common.table_with_download(peer_table, "peer_benchmark.csv")
