"""Quality: what each method costs as sparsity rises, and which setting buys the most speed per unit of quality."""
import plotly.express as px
import streamlit as st
from plotly.subplots import make_subplots

from pages import common
from sparse_core import figures, lab

st.title("Quality")
st.caption("Sparsity trades quality for speed. A sweep measures, on held-out text the thresholds never saw, how far "
           "the sparse model drifts from the dense one: perplexity (how surprised it is by the text; ×1.00 means no "
           "loss), KL divergence (how different its next-token probabilities are) and top-1 agreement (how often it "
           "picks the same next token). Greedy allocation gives each layer and projection its own share of the "
           "sparsity where it hurts least; uniform gives every one the same.")
current = common.current()
model = current.model

with st.form("sweep_form"):
    cols = st.columns([1.3, 1, 2.2, 1, 1])  # the targets' chips need the room: four of them are the default
    methods = cols[0].multiselect("Methods", list(common.METHODS), default=["TEAL thresholds"])
    allocations = cols[1].multiselect("Allocation", ["uniform", "greedy"], default=["uniform"],
                                      help="Greedy replays each block on calibration text, the slowest part of a sweep; the progress "
                                           "bar estimates the time left from its pace.")
    targets = cols[2].multiselect("Targets", [round(0.05 * i, 2) for i in range(1, 19)], default=[0.25, 0.4, 0.5, 0.6])
    tokens = cols[3].select_slider("Held-out tokens", [256, 512, 1024, 2048], value=lab.QUALITY_TOKENS,
                                   help=f"{lab.QUALITY_TOKENS:,} under the dense-prefill protocol is the one quality "
                                        "measurement every page shows for a setting.")
    protocol = cols[4].selectbox("Protocol", list(lab.PROTOCOLS), key="sweep_protocol",
                                 help="dense-prefill (TEAL's, and how the lab generates): each window's first half "
                                      "runs dense as a prompt's prefill does, its second half sparse and scored as "
                                      "decode steps are. all-sparse: every position sparse and scored, as with "
                                      "“Sparse prefill” on; harsher, and the lab's measurement before dense prefill.")
    text = common.uploaded_text("Your own evaluation text (optional)", key="quality_text")
    run = st.form_submit_button("Run sweep", type="primary")

chosen = [common.METHODS[m] for m in methods]
job = st.session_state.get("sweep_job")
if run:
    if not chosen or not allocations or not targets:
        st.error("Pick at least one method, one allocation and one target.")
    elif "cats" in chosen and not model.gated:
        st.error("CATS needs a gated MLP, and this model's MLP is not gated; drop CATS from the sweep.")
    else:
        if job is not None and job.running:
            job.stop()  # a new request replaces the running sweep, which stops at its next step
        # The sweep runs in its own thread with the model captured now; reruns of this page (any click) find it
        # in the session and show its progress instead of killing it.
        job = st.session_state.sweep_job = current.lab.start_sweep(chosen, sorted(targets), allocations, text=text,
                                                                   max_tokens=tokens, protocol=protocol)


def _charts(frame, key: str) -> None:
    """Quality against the weight reads skipped, and the bound against the quality loss, for a sweep's points."""
    frame = frame.assign(setting=frame.method.str.upper() + " " + frame.allocation, ppl_increase=frame.ppl_ratio - 1.0)
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Perplexity vs dense (×)", "KL(dense ‖ sparse), nats",
                                                           "Top-1 agreement"))
    for column, metric in enumerate(["ppl_ratio", "kl", "top1_agreement"], start=1):
        for trace in px.line(frame, x="weight_reads_skipped", y=metric, color="setting", markers=True).data:
            trace.showlegend = column == 1
            figure.add_trace(trace, row=1, col=column)
    figure.update_xaxes(title_text="weight reads skipped (measured)", tickformat=".0%")
    figure.update_layout(height=400, margin=figures.TITLED_MARGIN, legend_title_text="")
    st.plotly_chart(figure, width="stretch", key=f"{key}_quality")

    st.subheader("Speed against quality loss")
    st.caption("Up and to the left is better. The speedup here is the bound 1/(1−s) for the measured share s of "
               "weight reads skipped — what a perfectly memory-bound decoder could gain; the Speedup page measures "
               "what the kernels really reach on this machine.")
    pareto = px.scatter(frame, x="ppl_increase", y="bound", color="setting", text="target",
                        hover_data=["kl", "top1_agreement"],
                        labels={"ppl_increase": "perplexity increase", "bound": "speedup bound (×)"})
    pareto.update_traces(textposition="top center")
    pareto.update_layout(height=380, margin=dict(t=20, b=10), xaxis_tickformat=".0%", legend_title_text="")
    st.plotly_chart(pareto, width="stretch", key=f"{key}_pareto")


@st.fragment(run_every=1.0)
def watch_sweep() -> None:
    """The running sweep's progress, time left, Stop button and the points finished so far, redrawn every second
    without rerunning the page; when the sweep ends, the whole page reruns to draw its results."""
    running = st.session_state.get("sweep_job")
    if running is None or not running.running:
        st.rerun()
    stopping = running.cancel.is_set()
    done, total, left = running.done, running.total, None if stopping else running.seconds_left()
    label = "Stopping after the current step…" if stopping else "Sweeping…"
    st.progress(min(done / total, 1.0) if total else 0.0, text=common.progress_text(label, done, total, left))
    if running.waiting and not stopping:
        st.info(f"Holding still between chunks, {running.waiting}: a visitor's own request goes first, and the "
                "sweep goes on by itself after it.")
    points = list(running.points)
    st.caption(f"{len(points)} of {running.planned} points finished. The sweep keeps running while you use "
               f"the page; stopping it keeps the points finished so far.")
    st.button("Stop sweep", key="stop_sweep", on_click=running.stop)  # before this run: its bar says so at once
    if points:
        _charts(lab.points_frame(points), "running")
    else:
        st.info("Each point appears here as soon as it is measured.")


running = job is not None and job.running
if running:
    watch_sweep()  # the previous sweep's charts stay below while this one runs
elif job is not None and st.session_state.get("sweep_from") is not job:  # collect the outcome once
    st.session_state.sweep_from = job
    if job.state == "finished":
        st.session_state.sweep, st.session_state.sweep_note = job.frame, None
        st.session_state.sweep_on = job.measured_on
    elif job.state == "stopped" and len(job.frame):
        st.session_state.sweep = job.frame
        st.session_state.sweep_on = job.measured_on
        st.session_state.sweep_note = f"Partial sweep: stopped after {len(job.frame)} of {job.planned} points."
if job is not None and job.state == "failed":
    st.error(job.error)
if job is not None and job.state == "stopped" and not len(job.frame):
    st.info("The sweep was stopped before its first point was finished"
            + ("; the charts below are the previous sweep." if st.session_state.get("sweep") is not None else "."))
if running and st.session_state.get("sweep") is not None:
    st.subheader("The previous sweep")
    st.caption("Below: the previous sweep, until this one finishes.")
if st.session_state.get("sweep_note"):
    st.warning(st.session_state.sweep_note)

frame = st.session_state.get("sweep")
if frame is None or frame.empty:
    if not running:
        st.info("Choose methods, allocations and targets, then run a sweep.")
    st.stop()

swept_on = st.session_state.get("sweep_on", current.lab.label)
measured_how = lab.describe_protocol(frame.protocol.iloc[0], int(frame.held_out_tokens.iloc[0]))
if swept_on == current.lab.label:
    st.caption(f"Produced by: a sweep on {swept_on}; quality measured with {measured_how}.")
else:
    st.warning(f"Stale: swept on {swept_on}; the sidebar now loads {current.lab.label}. Run the sweep again.")
_charts(frame, "finished")

table = frame.round(4)
if st.session_state.get("sweep_note"):
    st.caption("Partial sweep: only the points finished before it was stopped (marked in the partial column).")
    table = table.assign(partial=True)
common.table_with_download(table, "sweep.csv")
st.markdown("""
**Reading guide.** Perplexity rises slowly at first and then sharply: the knee is where the thresholds start cutting
inputs that carry signal, and it sits lower for small models than for large ones; read it off the curves above
rather than from a rule. To see what a point means for answers, apply the setting and compare the texts on the
Playground.
""")
