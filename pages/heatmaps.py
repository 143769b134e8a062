"""Heatmaps: where the skipping happens, per layer and token, per neuron, and against the |x| distribution."""
import plotly.graph_objects as go
import streamlit as st

from pages import common
from sparse_core import report
from sparse_core.spec import GROUPS

GROUP_TITLES = {"attn_in": "Attention input (q, k, v)", "attn_out": "Attention output (o)",
                "mlp_in": "MLP input (gate, up)", "mlp_mid": "MLP intermediate (down)"}

current = common.sidebar()
st.title("Heatmaps")
st.caption("Each projection skips the inputs whose magnitude is at or below its threshold. These charts show where "
           "that happens: which layers and tokens skip most, which neurons are almost always active (\"hot\"), and "
           "how the threshold cuts the distribution of input magnitudes. Quality suffers where large inputs get "
           "skipped, so a threshold should sit in the dense low end of the histogram.")

generation = st.session_state.get("generation")
source = st.segmented_control("Data", ["Last generation", "Pasted text"], key="heatmap_source",
                              default="Last generation" if generation else "Pasted text")
if source == "Last generation":
    if generation is None:
        st.info("Generate something on the Playground first, or paste text.")
        st.stop()
    model, spec = generation.model, generation.spec
    ids = generation.prompt.ids + tuple(t.id for t in generation.tokens["sparse"])
    first_generated = len(generation.prompt.ids)
    st.caption(f"The prompt and the sparse run's output ({generation.method.upper()}, the setting it was generated with).")
else:
    text = st.text_area("Text to trace", key="heatmap_text", height=100,
                        placeholder="Paste any text; it is traced with the current sidebar setting.")
    if not text.strip():
        st.info("Paste some text to trace it with the current setting.")
        st.stop()
    if current.spec is None:
        st.stop()
    model, spec = current.model, current.spec
    ids = tuple(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    first_generated = None
if len(ids) > report.MAX_TRACE_TOKENS:
    st.caption(f"Showing the last {report.MAX_TRACE_TOKENS} of {len(ids)} tokens.")
    if first_generated is not None:
        first_generated -= len(ids) - report.MAX_TRACE_TOKENS

layer = st.slider("Layer for the neuron and histogram views", 0, model.num_layers - 1, model.num_layers // 2, key="heatmap_layer")
trace = common.traced(model, spec, ids, layer)
labels = [repr(t)[1:-1] for t in trace.tokens]

st.subheader("Skipped inputs per layer and token")
for group, tab in zip(GROUPS, st.tabs([GROUP_TITLES[g] for g in GROUPS])):
    with tab:
        matrix = report.skipped_matrix(trace, group)
        figure = go.Figure(go.Heatmap(z=matrix.values, x=list(matrix.columns), y=list(matrix.index), zmin=0, zmax=1,
                                      customdata=[labels] * len(matrix.index), colorscale="Teal",
                                      colorbar=dict(title="skipped", tickformat=".0%"),
                                      hovertemplate="layer %{y}, token %{x} %{customdata}<br>skipped %{z:.0%}<extra></extra>"))
        if first_generated is not None and first_generated > 0:
            figure.add_vline(x=first_generated - 0.5, line_dash="dash", annotation_text="generated →")
        figure.update_layout(height=380, margin=dict(t=30, b=10), xaxis_title="token", yaxis_title="layer")
        st.plotly_chart(figure, width="stretch", key=f"layers-{group}")

st.subheader(f"MLP neurons of layer {layer}")
hot_first = st.toggle("Hot neurons first (most often active)", value=True, key="hot_first")
neurons = report.neuron_view(trace, hot_first=hot_first)
figure = go.Figure(go.Heatmap(z=neurons.activations.T, x=list(range(len(labels))), y=[str(n) for n in neurons.neurons],
                              customdata=[labels] * len(neurons.neurons), colorscale="Viridis",
                              colorbar=dict(title="|activation|"),
                              hovertemplate="neuron %{y}, token %{x} %{customdata}<br>|activation| %{z:.3g}<extra></extra>"))
figure.update_layout(height=480, margin=dict(t=30, b=10), xaxis_title="token", yaxis_title="neuron",
                     yaxis=dict(type="category", showticklabels=False), plot_bgcolor="#e5e7eb")
st.plotly_chart(figure, width="stretch", key="neurons")
st.caption(f"|activation| of the MLP intermediate; grey cells are skipped at the current threshold. "
           f"{len(neurons.neurons)} of {model.group_widths['mlp_mid']} neurons shown"
           + (", the most often active first." if hot_first else "."))

st.subheader(f"Distribution of |x| in layer {layer}")
group = st.selectbox("Projection group", GROUPS, format_func=GROUP_TITLES.get, index=2, key="histogram_group")
bins = trace.trace.histogram.frame(layer, group)
threshold, below = report.threshold_marker(trace, group)
nonzero = bins[bins["abs_high"] > 0]
figure = go.Figure(go.Scatter(x=nonzero["abs_high"], y=nonzero["count"], line_shape="vh", fill="tozeroy",
                              line_color="#0f766e", hovertemplate="|x| up to %{x:.3g}: %{y} inputs<extra></extra>"))
figure.update_xaxes(type="log", title="|x|")
figure.update_yaxes(title="inputs")
if threshold:
    figure.add_vline(x=threshold, line_color="#dc2626", line_dash="dash",
                     annotation_text=f"threshold {threshold:.3g}: {below:.0%} below")
figure.update_layout(height=320, margin=dict(t=30, b=10))
st.plotly_chart(figure, width="stretch", key="histogram")
zeros = int(bins.loc[bins["abs_high"] == 0, "count"].sum())
st.caption(f"{below:.0%} of these inputs are skipped" + (f"; {zeros} are exactly zero (not drawn on the log axis)." if zeros else ".")
           + (" Top-k picks a threshold per token; the line is the single threshold that skips the same share." if spec and spec.method == "topk" else ""))
