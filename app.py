"""Activation-sparsity lab in the browser: this entry point only lists the pages. Each page draws the shared
settings sidebar itself (pages.common.sidebar), so a page renders the same whether Streamlit runs it through this
navigation or directly as a file of the pages/ folder (as AppTest does on reruns)."""
from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Sparsity lab", page_icon=str(HERE / "assets" / "logo.svg"), layout="wide")
page = st.navigation([
    st.Page("pages/playground.py", title="Playground", icon=":material/chat:", default=True),
    st.Page("pages/heatmaps.py", title="Heatmaps", icon=":material/grid_on:"),
    st.Page("pages/speedup.py", title="Speedup", icon=":material/speed:"),
    st.Page("pages/quality.py", title="Quality", icon=":material/query_stats:"),
    st.Page("pages/tuner.py", title="Tuner", icon=":material/tune:"),
])
page.run()
