"""Tuner: edit the per-layer, per-group sparsity, calibrate it uniform or greedy, import and export specs, compare two."""
import pandas as pd
import plotly.express as px
import streamlit as st

from pages import common
from sparse_core.spec import GROUPS, SparsitySpec, SpecError

st.title("Tuner")
st.caption("A spec holds one target per layer and projection group: the share of that group's inputs to skip. "
           "Calibration turns targets into magnitude thresholds on the calibration text. Edit the table, calibrate "
           "it, compare it with another spec, download it, or apply it to the Playground.")
current = common.current()

library: dict[str, SparsitySpec] = st.session_state.setdefault("spec_library", {})
if "tuner_select" in st.session_state:  # a spec kept on the last run: select it before the selectbox exists
    st.session_state.tuner_spec = st.session_state.pop("tuner_select")
text = common.uploaded_text("Your own calibration text (optional)", key="tuner_text")


def add_to_library(name: str, spec: SparsitySpec) -> None:
    """Add a spec, named, to this visitor's library and select it. A widget's value cannot change once it is drawn,
    so the selection travels to the next run, which starts at once. Keeping the same spec again (an upload that is
    still in its box) changes nothing."""
    named = spec.with_provenance(name=name)
    if library.get(name) == named:
        return
    library[name] = named
    st.session_state.tuner_select = name
    st.rerun()


method = current.method

cols = st.columns(3)
if cols[0].button(f"Calibrate uniform {current.target:.0%}", width="stretch"):
    with common.progress("Calibrating…") as update:
        uniform = current.lab.calibrate(method, current.target, text=text, progress=update)
    add_to_library(f"{method} uniform {current.target:.0%}", uniform)
if cols[1].button(f"Calibrate greedy {current.target:.0%}", width="stretch",
                  help="Greedy allocation: each block reaches the target, the projections where skipping hurts least first."):
    with common.progress("Allocating greedily, block by block…") as update:
        greedy = current.lab.calibrate(method, current.target, text=text, allocation="greedy", progress=update)
    add_to_library(f"{method} greedy {current.target:.0%}", greedy)
upload = cols[2].file_uploader("Upload a spec (JSON)", type=["json"], key="spec_upload")
if upload is not None:
    try:
        spec = common.read_spec(upload)
        current.lab.check(spec)
        add_to_library(f"uploaded {upload.name}", spec)
    except SpecError as err:
        st.error(str(err))

if not library:
    st.info("Calibrate a spec or upload one to start tuning.")
    st.stop()

name = st.selectbox("Spec", list(library), key="tuner_spec")
spec = library[name]
targets = spec.targets or spec.values
frame = pd.DataFrame(targets, columns=list(GROUPS)).rename_axis("layer").reset_index()
st.subheader("Per-layer targets")
st.caption("Edit any cell (0 = dense, 0.9 = skip 90 %), then calibrate the edited table into thresholds.")
edited = st.data_editor(frame, hide_index=True, disabled=["layer"], key=f"editor-{name}",
                        column_config={g: st.column_config.NumberColumn(g, min_value=0.0, max_value=1.0, step=0.05, format="%.2f") for g in GROUPS})
chart = edited.melt(id_vars="layer", var_name="group", value_name="target")
st.plotly_chart(px.line(chart, x="layer", y="target", color="group", markers=True, height=320)
                .update_layout(margin=dict(t=10, b=70), yaxis_tickformat=".0%", yaxis_range=[0, 1],
                               legend=dict(orientation="h", yanchor="top", y=-0.2, x=0)),  # clear of the toolbar
                width="stretch")

cols = st.columns(3)
if cols[0].button("Calibrate the edited table", width="stretch"):
    table = edited[list(GROUPS)].astype(float).values.tolist()
    try:
        with common.progress("Calibrating the edited table…") as update:
            edited_spec = current.lab.calibrate(spec.method, table, text=text, progress=update)
    except SpecError as err:
        st.error(str(err))
    else:
        add_to_library(f"{name} (edited)", edited_spec)
if cols[1].button("Apply to the Playground", type="primary", width="stretch"):
    st.session_state.applied_spec = (name, spec)
    st.success(f"The Playground now generates with “{name}”. Turn it off in the sidebar.")
cols[2].download_button("Download spec (JSON)", spec.to_json(), file_name="spec.json", mime="application/json", width="stretch")
st.subheader("What the spec applies")
st.caption("Top-k: the share of each token's inputs dropped. TEAL: the |x| at or below which an input is skipped. "
           "CATS: the |act(gate(x))| below which an MLP neuron is skipped.")
common.table_with_download(pd.DataFrame(spec.values, columns=list(GROUPS)).rename_axis("layer").reset_index(),
                           "thresholds.csv")

st.subheader("Compare two specs")
if len(library) < 2:
    st.caption("Calibrate or upload a second spec to compare.")
    st.stop()
left, right = st.columns(2)
first = left.selectbox("First", list(library), index=0, key="compare_a")
second = right.selectbox("Second", list(library), index=1, key="compare_b")
measured = {label: common.quality(current.lab, library[label]) for label in (first, second)}
results = {label: quality.as_dict() for label, quality in measured.items()}
per_layer = pd.DataFrame({label: r["per_layer_sparsity"] for label, r in results.items()}).rename_axis("layer").reset_index()
st.plotly_chart(px.bar(per_layer.melt(id_vars="layer", var_name="spec", value_name="skipped"), x="layer", y="skipped",
                       color="spec", barmode="group", height=320).update_layout(margin=dict(t=10, b=10), yaxis_tickformat=".0%"),
                width="stretch")
summary = pd.DataFrame([{"spec": label, **{k: v for k, v in r.items() if k not in ("per_layer_sparsity", "chunk_ppl_increase")}}
                        for label, r in results.items()])
common.table_with_download(summary.round(4), "comparison.csv")
st.caption(f"Quality measured with {measured[first].protocol_label}.")
