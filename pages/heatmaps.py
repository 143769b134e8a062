"""Heatmaps: where the skipping happens, per layer and token, per neuron, and against the |x| distribution."""
import plotly.graph_objects as go
import streamlit as st

from pages import common
from sparse_core import figures, views
from sparse_core.spec import GROUPS

SOURCES = ["Last generation", "Example text", "Pasted text"]
# What the page traces until there is a generation or a paste: plain prose, 61 tokens, so every word fits on the axis.
EXAMPLE_TEXT = ("The old lighthouse stood at the end of a narrow road, where the fields gave way to rocks and sea. "
                "Every evening the keeper climbed the spiral stairs, wiped the salt from the glass and lit the lamp. "
                "Ships passing in the dark could not see him, but they trusted his light all the same.")
EXAMPLE_REASONS = {"Last generation": "No generation yet (make one on the Playground), so this traces",
                   "Pasted text": "Nothing pasted yet, so this traces"}


st.title("Heatmaps")
st.caption("Each projection skips the inputs whose magnitude is at or below its threshold. These charts show where "
           "that happens: which layers and tokens skip most, which neurons are almost always active (\"hot\"), and "
           "how the threshold cuts the distribution of input magnitudes. Quality suffers where large inputs get "
           "skipped, so a threshold should sit in the dense low end of the histogram.")
current = common.current()

generation = st.session_state.get("generation")
source = st.segmented_control("Data", SOURCES, key="heatmap_source",
                              default="Last generation" if generation else "Example text")
if source == "Last generation" and generation is not None:
    held, spec = generation.lab, generation.spec
    ids = generation.ids()
    first_generated = len(generation.prompt.ids)
    st.caption(f"The prompt and the sparse run's output ({generation.method.upper()}, the setting it was generated with).")
else:
    pasted = "" if source != "Pasted text" else st.text_area(
        "Text to trace", key="heatmap_text", height=100, placeholder="Paste any text; it is traced with the current sidebar setting.")
    text = pasted
    if not pasted.strip():
        text = EXAMPLE_TEXT
        st.caption(f"{EXAMPLE_REASONS.get(source, 'This traces')} the example paragraph with the current sidebar "
                   f"setting: “{EXAMPLE_TEXT}”")
    if current.spec is None:
        st.stop()
    held, spec = current.lab, current.spec
    ids = held.token_ids(text)
    first_generated = None
if len(ids) > views.MAX_TRACE_TOKENS:
    st.caption(f"Showing the last {views.MAX_TRACE_TOKENS} of {len(ids)} tokens.")
    if first_generated is not None:
        first_generated -= len(ids) - views.MAX_TRACE_TOKENS

model = held.model
layer = st.slider("Layer for the neuron and histogram views", 0, model.num_layers - 1, model.num_layers // 2, key="heatmap_layer")
trace = common.traced(held, spec, ids, layer)

st.subheader("Skipped inputs per layer and token")
st.caption("Colours span the 2nd to 98th percentile of each chart, so a few extreme tokens do not flatten the rest; "
           "· marks a space, ↵ a line break.")
for group, tab in zip(GROUPS, st.tabs([figures.GROUP_TITLES[g] for g in GROUPS])):
    with tab:
        matrix = views.skipped_matrix(trace, group).values
        st.plotly_chart(figures.skipped_heatmap(matrix, trace.tokens, first_generated), width="stretch", key=f"layers-{group}")

st.subheader(f"MLP neurons of layer {layer}")
hot_first = st.toggle("Hot neurons first (most often active)", value=True, key="hot_first")
neurons = views.neuron_view(trace, hot_first=hot_first)
st.plotly_chart(figures.neuron_heatmap(neurons, trace.tokens), width="stretch", key="neurons")
shown, width = len(neurons.neurons), model.group_widths["mlp_mid"]
st.caption("|activation| of the MLP intermediate; grey = skipped at the current threshold. Colours stop at the "
           "1st and 99th percentile of the kept values, so a few outliers do not wash out the rest. "
           + (f"The {shown} most often active of {width} neurons, the most often active at the top." if hot_first
              else f"Neurons 0 to {shown - 1} of {width}, in index order from the top."))

st.subheader(f"Distribution of |x| in layer {layer}")
group = st.selectbox("Projection group", GROUPS, format_func=figures.GROUP_TITLES.get, index=2, key="histogram_group")
bins = trace.trace.histogram.frame(layer, group)
threshold, below = views.threshold_marker(trace, group)
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
