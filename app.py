"""Activation-sparsity lab in the browser. This entry point runs on every rerun of every page: it lists the pages,
draws the shared settings sidebar once (pages.common.sidebar), then runs the page, which only renders."""
from pathlib import Path

import streamlit as st

from pages import common

HERE = Path(__file__).parent

st.set_page_config(page_title="Sparsity lab", page_icon=str(HERE / "assets" / "logo.svg"), layout="wide")
page = st.navigation([
    st.Page("pages/playground.py", title="Playground", icon=":material/chat:", default=True),
    st.Page("pages/heatmaps.py", title="Heatmaps", icon=":material/grid_on:"),
    st.Page("pages/speedup.py", title="Speedup", icon=":material/speed:"),
    st.Page("pages/quality.py", title="Quality", icon=":material/query_stats:"),
    st.Page("pages/tuner.py", title="Tuner", icon=":material/tune:"),
])
common.sidebar()
page.run()
