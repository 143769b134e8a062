"""Speedup: does skipping inputs turn into time saved? Kernel, per-layer and end-to-end measurements."""
import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from pages import common
from sparse_core import bench, generate, ops, report

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _progress(label: str):
    """A progress bar and the (done, total) callback the benchmarks report to."""
    bar = st.progress(0.0, text=label)
    return bar, lambda done, total: bar.progress(done / total, text=f"{label} {done}/{total}")


current = common.sidebar()
st.title("Speedup")
st.caption("Decoding one token at a time is limited by how fast the weights stream from memory, so skipping a share "
           "s of the weight reads can at best make it 1/(1−s) times faster: that is the **bound** drawn on every "
           f"chart. Real kernels reach part of it. Active backend: {ops.describe_backends()}.")
if current.method == "cats" and current.model.layout == "inputs":
    st.caption("CATS in the **inputs** weight layout skips only the down projection's reads; pick the **cats** "
               "layout in the sidebar to skip the up rows of inactive neurons too.")

st.subheader("Kernel: one linear layer at batch 1")
shape_names = {f"{o}×{i}": (o, i) for o, i in bench.SHAPES}
left, middle, right = st.columns([2, 1, 1])
shapes = left.multiselect("Weight shapes (out × in)", list(shape_names), default=list(shape_names), key="bench_shapes")
dtypes = middle.multiselect("Dtypes", list(bench.DTYPES), default=list(bench.DTYPES), key="bench_dtypes")
full = right.toggle("Full run", key="bench_full",
                    help="On: 5 sparsities, 30 repeats. Off: the quick run, 3 sparsities and 8 repeats.")
if st.button("Run kernel benchmark", type="primary", disabled=not (shapes and dtypes)):
    bar, progress = _progress("Timing dense vs sparse kernels…")
    rows = bench.kernel_rows([shape_names[s] for s in shapes], dtypes, bench.SPARSITIES if full else bench.QUICK_SPARSITIES,
                             repeats=30 if full else bench.QUICK_REPEATS, device=DEVICE, progress=progress)
    bar.empty()
    st.session_state.kernel_rows = pd.DataFrame(rows)
kernels = st.session_state.get("kernel_rows")
if kernels is not None:
    kernels = kernels.assign(shape=kernels["out_features"].astype(str) + "×" + kernels["in_features"].astype(str))
    figure = px.line(kernels, x="sparsity", y="speedup", color="shape", facet_col="dtype", markers=True,
                     labels={"speedup": "speedup vs dense"})
    bound = kernels.drop_duplicates("sparsity").sort_values("sparsity")
    for column in range(1, kernels["dtype"].nunique() + 1):
        figure.add_scatter(x=bound["sparsity"], y=bound["bound"], mode="lines", name="bound 1/(1−s)",
                           line=dict(color="#6b7280", dash="dash"), showlegend=column == 1, row=1, col=column)
    figure.update_layout(height=380, margin=dict(t=40, b=10))
    st.plotly_chart(figure, width="stretch", key="kernel_chart")
    common.table_with_download(kernels.drop(columns="shape"), "kernel_benchmark.csv")

st.subheader("One decode step, layer by layer")
st.caption("Wall time of each decoder layer while generating a few tokens, dense vs the current sidebar setting "
           "(median over the steps; the first step, which reads the whole prompt, is left out).")
if current.spec is not None and st.button("Time the layers", key="time_layers"):
    with st.status("Timing decode steps dense and sparse…") as status:
        prompt = generate.encode_prompt(current.model, bench.PROMPT)
        st.session_state.layer_times = report.decode_step_breakdown(current.model, prompt, current.spec, new_tokens=8)
        status.update(label="Decode steps timed", state="complete")
layer_times = st.session_state.get("layer_times")
if layer_times is not None:
    long = layer_times.melt(id_vars="part", var_name="run", value_name="ms")
    figure = px.bar(long, x="part", y="ms", color="run", barmode="group", labels={"part": "", "ms": "ms per step"})
    figure.update_layout(height=340, margin=dict(t=30, b=10))
    st.plotly_chart(figure, width="stretch", key="layer_chart")
    totals = layer_times[["dense_ms", "sparse_ms"]].sum()
    st.caption(f"Whole step: {totals['dense_ms']:.1f} ms dense, {totals['sparse_ms']:.1f} ms sparse.")
    common.table_with_download(layer_times, "decode_step_layers.csv")

st.subheader("End to end: tokens per second")
new_tokens = st.slider("Tokens per run", 8, 128, 32, 8, key="e2e_tokens",
                       help="Each side runs three times after a warm-up; the median is shown.")
if st.button("Measure tokens/s", key="e2e"):
    bar, progress = _progress("Decoding dense and sparse…")
    result = bench.decode_result(current.target, new_tokens, model=current.model, progress=progress)
    bar.empty()
    st.session_state.decode_result = pd.DataFrame([result])
decode = st.session_state.get("decode_result")
if decode is not None:
    row = decode.iloc[0]
    cols = st.columns(4)
    cols[0].metric("Dense tokens/s", f"{row['dense_tok_s']:.1f}")
    cols[1].metric("Sparse tokens/s", f"{row['sparse_tok_s']:.1f}")
    cols[2].metric("Speedup", f"×{row['speedup']:.2f}")
    cols[3].metric("Model bound", f"×{row['bound']:.2f}", help="Dense weight bytes per token over sparse ones: the "
                   "embedding lookup, norms and output head are read in full either way.")
    st.caption(f"TEAL at the sidebar's target, measured sparsity {row['achieved_sparsity']:.0%}, {row['model']} in {row['dtype']}.")
    common.table_with_download(decode, "decode_benchmark.csv")
