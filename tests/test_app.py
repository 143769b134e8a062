"""Every page through Streamlit's AppTest, with the real embedded model. The model, calibrated specs and quality
numbers are cached in-process, so only the first test pays for loading and calibrating TEAL at 25 %."""
import gc
import html
import json
import shutil
import weakref

import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_core import models, views

TIMEOUT = 300  # seconds per script run; importing torch and the first calibration take a while on 2 cores


@pytest.fixture(autouse=True)
def every_run_starts_at_app_py(monkeypatch):
    """Run app.py (navigation, the shared sidebar, then the page) on every rerun, as `streamlit run` does. AppTest
    resets PagesManager.uses_pages_directory before each run, and with a pages/ folder beside app.py that makes
    reruns execute the page file alone (Streamlit's first multipage API), skipping the sidebar app.py draws; the
    server keeps it False once st.navigation has run, and so does this."""
    from streamlit.runtime.pages_manager import PagesManager
    original = PagesManager.__init__

    def navigation_only(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", navigation_only)


def _app(**state) -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _generated(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if "class='generated'" in m.value]


def _setting(at: AppTest) -> str:
    """The headline card's first line: the setting every figure on it belongs to."""
    return next(m.value for m in at.markdown if m.value.startswith("**") and " layout · " in m.value)


def _generate(at: AppTest, tokens: int = 8) -> AppTest:
    at.slider(key="max_new_tokens").set_value(tokens)
    next(b for b in at.button if b.label == "Generate").click()
    return _ok(at.run())


def test_playground_opens_with_the_headline_card_of_the_setting():
    """The headline's quality figures are the setting's one stored measurement (metrics.measured), labelled with
    the setting; without a speed measurement it says so and offers one."""
    from sparse_core import calibrate, metrics, models
    at = _ok(_app())
    assert at.title[0].value == "Playground"
    assert at.slider(key="target").value == 0.25 and at.radio(key="method_label").value == "TEAL thresholds"
    assert at.slider(key="target").label == "Inputs skipped (target)"
    assert at.sidebar.toggle(key="trust_remote_code").value is False  # remote code is an explicit opt-in
    assert at.session_state["last_loaded"] == (models.DEFAULT_MODEL, "float32", "inputs", "cpu")
    assert _setting(at) == "**TEAL thresholds at 25% · float32 · inputs layout · cpu**"
    from pages.common import load_lab
    smollm2 = load_lab(models.DEFAULT_MODEL, "float32", "inputs").model
    measured = metrics.measured(smollm2, calibrate.calibrate(smollm2, "teal", 0.25))
    assert _metric(at, "Reads skipped (measured)") == f"{measured.weight_reads_skipped:.1%}"
    assert _metric(at, "Speedup bound") == f"×{measured.bound:.2f}"
    assert _metric(at, "Perplexity change") == f"{measured.ppl_increase:+.1%}"
    assert _metric(at, "Top-1 agreement") == f"{measured.top1_agreement:.0%}"
    assert any(m.value.startswith(f"Skips {measured.weight_reads_skipped:.0%} of weight reads")
                                    for m in at.markdown)
    assert measured.protocol == "dense-prefill"  # the default protocol, as the lab generates, and the card says so
    assert f"Quality measured with {measured.protocol_label}." in [c.value for c in at.caption]


def test_slider_and_method_change_what_is_computed():
    at = _ok(_app())
    teal = _metric(at, "Top-1 agreement"), _metric(at, "Perplexity change")
    at.radio(key="method_label").set_value("top-k")
    _ok(at.run())
    topk_25 = _metric(at, "Top-1 agreement"), _metric(at, "Perplexity change")
    assert topk_25 != teal
    at.slider(key="target").set_value(0.5)
    _ok(at.run())
    reads = float(_metric(at, "Reads skipped (measured)").rstrip("%")) / 100
    assert 0.35 < reads < 0.45  # half of the sparsifiable reads: the tied head and embedding are read in full
    assert float(_metric(at, "Perplexity change").rstrip("%")) > float(topk_25[1].rstrip("%"))
    at.radio(key="method_label").set_value("CATS gate")
    _ok(at.run())
    assert at.slider(key="target").label == "MLP neurons skipped (target)"  # CATS thresholds MLP neurons
    assert _setting(at).startswith("**CATS gate at 50% ·")
    assert float(_metric(at, "Reads skipped (measured)").rstrip("%")) < 20  # down's rows only, not 50 %


def test_generation_compares_equal_steps_and_marks_itself_stale_when_the_setting_moves():
    at = _generate(_ok(_app()))
    dense, sparse = _generated(at)
    assert len(dense) > len("<div class='generated'></div>") and len(sparse) > len("<div class='generated'></div>")
    generation = at.session_state["generation"]
    rates = generation.rates
    assert rates.steps == min(len(generation.tokens["dense"]), len(generation.tokens["sparse"])) - 1
    assert _metric(at, "Dense tokens/s") == f"{rates.dense:.1f}" and _metric(at, "Sparse tokens/s") == f"{rates.sparse:.1f}"
    sparse_metric = next(m for m in at.metric if m.label == "Sparse tokens/s")
    if generation.flag:  # above this generation's bound or too noisy: never presented as a ratio
        assert sparse_metric.delta.startswith("ratio flagged") and any("is not a result" in w.value for w in at.warning)
    else:
        assert sparse_metric.delta == f"×{rates.speedup:.2f}: {'faster' if rates.speedup >= 1 else 'slower'}"
    decoded = generation.tokens["sparse"][1:]  # the prompt's prefill makes the first token and is not counted
    assert not generation.partial and len(generation.counters["sparse"].pass_matrix("mlp_in", 30)[0]) == len(decoded)
    live = json.loads(next(c for c in at.get("plotly_chart") if "Skipped in each decode step" in c.proto.spec).proto.spec)
    z = live["data"][0]["z"]  # plotly sends numeric arrays as {"bdata", "shape"}
    rows, columns = map(int, z["shape"].split(",")) if isinstance(z, dict) else (len(z), len(z[0]))
    assert len(live["data"]) == 4 and rows == 30  # four groups, one row per layer
    assert columns == len(decoded)  # one column per decode step
    assert live["layout"]["xaxis"]["ticktext"][0] == views.token_labels([decoded[0].text])[0]
    assert at.success or at.warning  # same tokens, or where they diverge
    assert "Produced by: TEAL thresholds at 25% · float32 · inputs layout · cpu." in [c.value for c in at.caption]
    labels = {m.label for m in at.metric}
    assert {"Bound for this generation's weight reads", "Running speedup", "Bound so far"} <= labels
    assert len(at.get("plotly_chart")) == 3  # live heatmap, neuron view, per-layer sparsity of this generation
    cost = at.dataframe[0].value.set_index("per token")
    assert cost.loc["weight bytes read", "sparse"] < cost.loc["weight bytes read", "dense"]
    assert len(generation.tokens["dense"]) <= 8 and generation.achieved > 0.15

    at.slider(key="target").set_value(0.4)  # the old result is marked stale, never relabelled
    _ok(at.run())
    assert any(w.value.startswith("Stale: produced by TEAL thresholds at 25% · float32") for w in at.warning)
    assert any(m.value == "**Sparse** · TEAL thresholds at 25% (stale: the sidebar now says TEAL thresholds at 40%)"
               for m in at.markdown)


def test_the_compiled_step_toggle_generates_the_same_text_and_says_so():
    """Off in the tests by default (SPARSE_LAB_COMPILE=0, conftest); on in the app wherever the model supports it."""
    at = _generate(_ok(_app()))
    eager = at.session_state["generation"]
    toggle = at.sidebar.toggle(key="compiled")
    assert toggle.value is False and not toggle.disabled and toggle.label == "Compiled decode step"
    toggle.set_value(True)
    at = _generate(_ok(at.run()))
    compiled = at.session_state["generation"]
    assert compiled.compiled and not eager.compiled
    assert [t.id for t in compiled.tokens["dense"]] == [t.id for t in eager.tokens["dense"]]  # greedy: same tokens
    assert len(compiled.counters["sparse"].pass_matrix("mlp_in", 30)[0]) == len(compiled.tokens["sparse"]) - 1  # the live heatmap's
    assert compiled.achieved == pytest.approx(eager.achieved, abs=0.02)  # counts come from the compiled step
    assert "Produced by: TEAL thresholds at 25% · float32 · inputs layout · cpu · compiled." in [c.value for c in at.caption]
    assert _setting(at) == "**TEAL thresholds at 25% · float32 · inputs layout · cpu · compiled**"


def test_sparse_prefill_is_off_by_default_and_when_on_thresholds_the_prompt_too():
    """The prompt's prefill runs dense unless the visitor asks; on, the sparse run is the engine's own sparse-prefill
    generation, and the setting says so."""
    from sparse_core import calibrate, generate, models
    from pages.common import load_lab
    at = _ok(_app())
    toggle = at.sidebar.toggle(key="sparse_prefill")
    assert toggle.value is False and toggle.label == "Sparse prefill"
    toggle.set_value(True)
    at = _generate(_ok(at.run()), tokens=6)
    generation = at.session_state["generation"]
    assert generation.sparse_prefill and _setting(at) == "**TEAL thresholds at 25% · float32 · inputs layout · cpu · sparse prefill**"
    assert any("“Sparse prefill” thresholds the prompt too" in c.value for c in at.caption)
    model = load_lab(models.DEFAULT_MODEL, "float32", "inputs").model
    spec = calibrate.calibrate(model, "teal", 0.25)
    prompt = generate.encode_prompt(model, generation.prompt_text, max_new_tokens=6)
    expected = generate.generate(model, prompt, spec, max_new_tokens=6, sparse_prefill=True)
    assert [t.id for t in generation.tokens["sparse"]] == [t.id for t in expected.tokens]
    assert len(generation.counters["sparse"].pass_matrix("mlp_in", 30)[0]) == len(generation.tokens["sparse"]) - 1


def test_the_report_download_is_one_offline_html_file_of_the_generation(tmp_path):
    at = _generate(_ok(_app()))
    assert any(b.label == "Download report" for b in at.get("download_button"))
    generation = at.session_state["generation"]
    assert generation.report is not None  # built in the page run, not on click
    path = tmp_path / "report.html"
    path.write_text(generation.report, encoding="utf-8")  # what the button hands the browser
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("Plotly.newPlot(") == 3  # heatmap, speed, quality
    assert "<script src=" not in page and "<link" not in page  # nothing to fetch: opens offline
    for shown in ("SmolLM2-135M-Instruct", "TEAL thresholds at 25%", "float32", "inputs", "Weight reads skipped",
                  "Speedup bound", "Perplexity change", "Top-1 agreement", "CPU cores", "Skipped share per layer"):
        assert shown in page, shown
    assert html.escape(generation.text("dense")) in page
    if generation.divergence is not None:
        assert "<mark>" in page


def test_a_slowdown_reads_as_one():
    from pages.common import speedup_delta
    assert speedup_delta(0.95) == dict(delta="×0.95: slower", delta_color="red", delta_arrow="down")
    assert speedup_delta(1.2) == dict(delta="×1.20: faster", delta_color="green", delta_arrow="up")


def test_measure_decode_speed_fills_the_headline_and_the_speedup_page_shows_the_same(monkeypatch):
    from sparse_core import bench
    monkeypatch.setattr(bench, "DECODE_TOKENS", 4)  # the page passes these at call time: a short measurement
    monkeypatch.setattr(bench, "DECODE_REPEATS", 2)
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: None)  # a valid measurement (the flags have tests of their own)
    shutil.rmtree(bench._DECODES.folder, ignore_errors=True)  # the tests' own cache (conftest): measure anew
    at = _ok(_app(target=0.35))
    assert _metric(at, "Decode speedup") == "—"
    assert any(m.value.endswith("no valid decode measurement yet, so no speedup is claimed.") for m in at.markdown)
    next(b for b in at.button if b.label == "Measure decode speed").click()
    _ok(at.run())
    shown = _metric(at, "Decode speedup")
    assert shown.startswith("×") and not at.warning
    headline = next(m.value for m in at.markdown if m.value.startswith("Skips "))
    assert f"{shown} " in headline
    _ok(at.switch_page("pages/speedup.py").run())
    assert _metric(at, "Speedup") == shown  # the same stored measurement on both pages
    assert any(c.value.startswith("Measured for TEAL thresholds at 35% · float32") for c in at.caption)


def test_a_flagged_decode_measurement_is_said_and_never_drawn(monkeypatch):
    """A measurement on a busy machine is flagged: the headline claims no speedup, the Speedup page draws no bars
    and says why, and the table keeps the raw figures with the flag."""
    from sparse_core import bench
    monkeypatch.setattr(bench, "DECODE_TOKENS", 4)
    monkeypatch.setattr(bench, "DECODE_REPEATS", 2)
    noisy = "noisy: interquartile range 40% of the median (the machine was busy)"
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: noisy)
    shutil.rmtree(bench._DECODES.folder, ignore_errors=True)
    at = _ok(_app(target=0.4))
    next(b for b in at.button if b.label == "Measure decode speed").click()
    _ok(at.run())
    assert _metric(at, "Decode speedup") == "—"
    assert [w.value for w in at.warning] == [f"The last decode measurement of this setting is not shown as a result: {noisy}."]
    assert any(m.value.endswith("no speedup is claimed.") for m in at.markdown if m.value.startswith("Skips "))
    _ok(at.switch_page("pages/speedup.py").run())
    assert not [m for m in at.metric if m.label == "Speedup"] and not _figures(at)
    assert any(w.value.startswith(f"The last measurement of this setting is not a result: {noisy}") for w in at.warning)
    assert at.dataframe[-1].value.iloc[0]["flag"] == noisy


def test_user_errors_are_one_sentence_and_the_app_keeps_running():
    at = _ok(_app())
    at.text_area(key="prompt").set_value("   ")
    next(b for b in at.button if b.label == "Generate").click()
    _ok(at.run())
    assert [e.value for e in at.error] == ["The prompt is empty; type something for the model to continue."]

    at.text_input(key="model_name").set_value("no-such-org/no-such-model")
    _ok(at.run())
    assert at.error[0].value.startswith("Could not find model 'no-such-org/no-such-model'")
    assert "Still using SmolLM2-135M-Instruct (float32, cpu)." in [c.value for c in at.sidebar.caption]
    assert _metric(at, "Perplexity change")  # the page still works on the last model that loaded
    at.text_input(key="model_name").set_value(models.DEFAULT_MODEL)
    if not torch.cuda.is_available():
        at.selectbox(key="device").set_value("cuda")
        _ok(at.run())
        assert at.error[0].value.startswith("CUDA was asked for, but torch sees no usable CUDA device")
        assert "Still using SmolLM2-135M-Instruct (float32, cpu)." in [c.value for c in at.sidebar.caption]
        assert _metric(at, "Perplexity change")
        at.selectbox(key="device").set_value("cpu")
    at.selectbox(key="layout").set_value("cats")
    at.selectbox(key="dtype").set_value("int8")  # int8 rows are read in the inputs layout only
    _ok(at.run())
    assert [e.value for e in at.error] == ["int8 weights run on the CPU, in the inputs layout, on one device; choose "
                                           "those, or float32 or bfloat16 weights."]
    assert "Still using SmolLM2-135M-Instruct (float32, cpu)." in [c.value for c in at.sidebar.caption]
    assert _metric(at, "Perplexity change")


def _figures(at: AppTest) -> list[dict]:
    """The plotly figures on the page, as the browser receives them."""
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_heatmaps_page_on_the_last_generation_and_on_pasted_text():
    at = _generate(_ok(_app()))
    _ok(at.switch_page("pages/heatmaps.py").run())
    assert at.title[0].value == "Heatmaps"
    assert at.segmented_control(key="heatmap_source").value == "Last generation"
    assert len(at.get("plotly_chart")) == 6  # four projection groups, neurons, histogram
    assert any("grey = skipped" in c.value for c in at.caption)
    neurons = _figures(at)[4]
    assert neurons["layout"]["yaxis"]["autorange"] == "reversed"  # the first (hottest) neuron on top
    hot = neurons["data"][0]["y"]
    assert hot != sorted(hot, key=int) and any("most often active at the top" in c.value for c in at.caption)
    at.toggle(key="hot_first").set_value(False)
    _ok(at.run())
    assert _figures(at)[4]["data"][0]["y"][:3] == ["0", "1", "2"] and any("in index order" in c.value for c in at.caption)

    at.segmented_control(key="heatmap_source").set_value("Pasted text")
    _ok(at.run())
    assert any(c.value.startswith("Nothing pasted yet") for c in at.caption)  # the example instead of a blank page
    assert len(at.get("plotly_chart")) == 6
    at.text_area(key="heatmap_text").set_value("The lighthouse keeper walked along the beach at dawn.")
    _ok(at.run())
    assert "·beach" in _figures(at)[0]["layout"]["xaxis"]["ticktext"]
    at.slider(key="heatmap_layer").set_value(3)
    _ok(at.run())
    assert len(at.get("plotly_chart")) == 6 and at.subheader[1].value == "MLP neurons of layer 3"
    assert at.session_state["target"] == 0.25  # the sidebar kept its setting across the page change
    trace = weakref.ref(at.session_state["trace"][1])
    del at
    gc.collect()
    assert trace() is None  # the trace lived in that visitor's session only: gone with it


def test_heatmaps_page_opens_with_charts_on_first_visit():
    at = _ok(_app())
    _ok(at.switch_page("pages/heatmaps.py").run())
    assert at.segmented_control(key="heatmap_source").value == "Example text"
    figures = _figures(at)
    assert len(figures) == 6
    layers = figures[0]
    words = layers["layout"]["xaxis"]["ticktext"]
    assert len(words) == len(layers["data"][0]["x"]) and "·lighth…" in words and "·keeper" in words  # every word
    assert 0 < layers["data"][0]["zmax"] < 1  # the colours span this text's range, not 0-100 %
    neurons = figures[4]
    assert neurons["layout"]["plot_bgcolor"] == "#9ca3af" and "·keeper" in neurons["layout"]["xaxis"]["ticktext"]


def test_speedup_page_runs_the_benchmarks_on_the_selected_method(monkeypatch):
    from sparse_core import bench, views
    monkeypatch.setattr(bench, "DECODE_TOKENS", 4)
    monkeypatch.setattr(bench, "DECODE_REPEATS", 2)
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: None)  # every timing valid: the page draws them all
    monkeypatch.setattr(views, "REST_DRIFT", float("inf"))
    shutil.rmtree(bench._DECODES.folder, ignore_errors=True)
    at = _ok(_app(method_label="top-k", target=0.3))
    _ok(at.switch_page("pages/speedup.py").run())
    assert at.title[0].value == "Speedup"
    at.multiselect(key="bench_shapes").set_value(["576×1536"])
    at.multiselect(key="bench_dtypes").set_value(["float32"])
    next(b for b in at.button if b.label == "Run kernel benchmark").click()
    _ok(at.run())
    kernels = at.dataframe[0].value
    assert list(kernels["sparsity"]) == [0.0, 0.5, 0.9] and (kernels["speedup"] > 0).all()
    assert set(kernels["dense_path"]) <= {"hf", "linear", "kernel"} and "flag" in kernels
    bandwidth_chart = _figures(at)[1]  # achieved GB/s against the read bandwidth measured in the same run
    assert [s["y0"] for s in bandwidth_chart["layout"]["shapes"]] == [kernels["bandwidth_gbs"].iloc[0]]

    at.button(key="time_layers").click()
    _ok(at.run())
    layers = at.dataframe[1].value
    assert len(layers) == 31 and (layers[["dense_ms", "sparse_ms"]] >= 0).all().all()
    assert "Produced by: top-k at 30% · float32 · inputs layout · cpu." in [c.value for c in at.caption]
    assert any(c.value.startswith("Whole step: ") and "bound ×" in c.value for c in at.caption)

    assert any(i.value.startswith("Not measured for this setting yet") for i in at.info)
    next(b for b in at.button if b.label == "Measure tokens/s").click()
    _ok(at.run())
    assert float(_metric(at, "Dense tokens/s")) > 0 and _metric(at, "Speedup bound").startswith("×")
    decode = at.dataframe[2].value.iloc[0]
    assert (decode["method"], decode["spec"]) == ("topk", "TOPK 30%")  # the sidebar's method, not TEAL
    limits = [c.value for c in at.caption if c.value.startswith("The dotted lines are the memory-bandwidth limits")]
    assert limits and f"Dense reaches {decode['dense_fraction_of_limit']:.0%} of its limit" in limits[0]
    decode_chart = _figures(at)[-1]
    assert len([s for s in decode_chart["layout"]["shapes"] if s["line"]["dash"] == "dot"]) == 2
    assert len(at.get("plotly_chart")) == 4 and len(at.get("download_button")) == 3  # kernels: ratios, GB/s; layers; decode


def test_the_speedup_page_shows_llama_cpp_beside_the_lab_or_says_how_to_measure_it(monkeypatch):
    from sparse_core import peer
    from test_peer import RESULT
    monkeypatch.setattr(peer, "stored", lambda device="cpu": None)
    at = _ok(_app())
    _ok(at.switch_page("pages/speedup.py").run())
    assert any("run `make peer`" in i.value for i in at.info)
    monkeypatch.setattr(peer, "stored", lambda device="cpu": RESULT)
    _ok(at.run())
    frame = next(d.value for d in at.dataframe if "× llama.cpp (same precision)" in d.value)
    assert list(frame["tok/s"]) == [52.0, 60.0] and list(frame["× lab dense"])[1] == 1.5
    assert any("abc1234 (build 7)" in c.value for c in at.caption)


def test_the_cats_layout_is_a_second_model_that_skips_up_rows_under_cats():
    at = _ok(_app(method_label="CATS gate"))
    bound = lambda: float(_metric(at, "Speedup bound").lstrip("×"))
    inputs_bound = bound()
    at.selectbox(key="layout").set_value("cats")
    _ok(at.run())
    assert bound() > inputs_bound  # up's rows now count as skipped reads
    assert _setting(at).endswith("· cats layout · cpu**")
    _ok(at.switch_page("pages/speedup.py").run())
    assert not any("inputs** weight layout" in c.value for c in at.caption)
    at.selectbox(key="layout").set_value("inputs")
    _ok(at.run())
    assert any("inputs** weight layout" in c.value for c in at.caption)


def test_quality_page_runs_a_sweep_and_refuses_an_empty_one():
    from sparse_core import calibrate, metrics
    from pages.common import load_lab
    at = _ok(_app())
    _ok(at.switch_page("pages/quality.py").run())
    assert at.title[0].value == "Quality" and at.info
    assert at.select_slider[0].value == metrics.QUALITY_TOKENS  # the default is the one measurement
    at.multiselect[0].set_value([])
    at.button[0].click()  # the form's submit button
    _ok(at.run())
    assert at.error[0].value == "Pick at least one method, one allocation and one target."
    at.multiselect[0].set_value(["TEAL thresholds", "top-k"])
    at.multiselect[2].set_value([0.25, 0.5])
    next(b for b in at.button if b.label == "Run sweep").click()
    _ok(at.run())
    _until_the_sweep_ends(at)
    assert at.session_state["sweep_job"].state == "finished" and not at.warning
    sweep = at.session_state["sweep"]
    assert len(sweep) == 4 and set(sweep.method) == {"teal", "topk"}
    assert (sweep[sweep.target == 0.5].ppl_ratio.values > sweep[sweep.target == 0.25].ppl_ratio.values).all()
    assert len(at.get("plotly_chart")) == 2 and len(at.dataframe) == 1
    model = load_lab("SmolLM2-135M-Instruct", "float32", "inputs").model
    teal_25 = sweep[(sweep.method == "teal") & (sweep.target == 0.25)].iloc[0]
    measured = metrics.measured(model, calibrate.calibrate(model, "teal", 0.25))  # what the Playground shows
    assert (teal_25.ppl_sparse, teal_25.kl, teal_25.weight_reads_skipped) == (measured.ppl_sparse, measured.kl,
                                                                            measured.weight_reads_skipped)
    assert any(c.value.endswith(f"quality measured with {measured.protocol_label}.") for c in at.caption)

    at.selectbox(key="sweep_protocol").set_value("all-sparse")  # today's harsher protocol, measured and labelled as such
    at.multiselect[0].set_value(["TEAL thresholds"])
    at.multiselect[2].set_value([0.25])
    at.select_slider[0].set_value(1024)
    next(b for b in at.button if b.label == "Run sweep").click()
    _until_the_sweep_ends(_ok(at.run()))
    sweep = at.session_state["sweep"]
    harsh = metrics.measured(model, calibrate.calibrate(model, "teal", 0.25), protocol="all-sparse")
    assert list(sweep.protocol) == ["all-sparse"] and sweep.kl.iloc[0] == harsh.kl != measured.kl
    assert any(c.value.endswith(f"quality measured with {harsh.protocol_label}.") for c in at.caption)


def _sweep_topk(at: AppTest, target: float) -> AppTest:
    """On the Quality page: a one-point top-k sweep on 256 held-out tokens, Run pressed."""
    at.multiselect[0].set_value(["top-k"])
    at.multiselect[2].set_value([target])
    at.select_slider[0].set_value(256)
    next(b for b in at.button if b.label == "Run sweep").click()
    return _ok(at.run())


def _until_the_sweep_ends(at: AppTest, timeout: float = 300) -> AppTest:
    """Rerun the page (AppTest runs fragments only with the script, never on their timer) until the background
    sweep has ended, then once more: the run that finds it ended draws its results."""
    import time
    deadline = time.monotonic() + timeout
    while at.session_state["sweep_job"].running:
        assert time.monotonic() < deadline, "the sweep did not end in time"
        time.sleep(0.5)
        _ok(at.run())
    return _ok(at.run())


def test_a_sweep_runs_beside_clicks_and_stops_with_its_finished_points(monkeypatch):
    """The sweep runs in the background: a rerun from another widget leaves it running with its progress shown;
    "Stop sweep" ends it within the point it is measuring, and the points finished so far are drawn and labelled partial, uncached."""
    import threading
    import time
    from sparse_core import tuning
    release, measured_calls = threading.Event(), []
    real_measured = tuning.measured

    def held(model, spec, **kwargs):  # the second point waits until the test has clicked around and pressed Stop
        if measured_calls:
            release.wait(timeout=300)
            kwargs["progress"](1, 4)  # its first chunk done: a Stop takes effect here, inside the point
        measured_calls.append(spec)
        return real_measured(model, spec, **kwargs)
    monkeypatch.setattr(tuning, "measured", held)
    try:
        at = _ok(_app())
        _ok(at.switch_page("pages/quality.py").run())
        at.multiselect[0].set_value(["TEAL thresholds", "top-k"])
        at.multiselect[2].set_value([0.25, 0.4, 0.5])
        at.select_slider[0].set_value(256)
        cached_before = set(tuning._SWEEPS)
        next(b for b in at.button if b.label == "Run sweep").click()
        _ok(at.run())
        job = at.session_state["sweep_job"]
        assert job.running and job.planned == 6
        deadline = time.monotonic() + 300
        while len(job.points) < 1 and job.running and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(job.points) == 1 and job.running  # the second point is held

        at.slider(key="max_new_tokens").set_value(16)  # a rerun from a widget that does not change the model
        _ok(at.run())
        assert at.session_state["sweep_job"] is job and job.running and not job.cancel.is_set()
        bar = at.get("progress")[0].proto
        assert bar.text.startswith("Sweeping… 1/6") and "s left" in bar.text
        assert any(c.value.startswith("1 of 6 points finished") for c in at.caption)
        # This sweep's finished point is drawn while it runs (and no chart of an earlier sweep)
        assert [chart.key for chart in at.get("plotly_chart")] == ["running_quality", "running_pareto"]

        next(b for b in at.button if b.label == "Stop sweep").click()
        _ok(at.run())
        assert job.cancel.is_set() and at.get("progress")[0].proto.text.startswith("Stopping after the current step…")
    finally:
        release.set()
    _until_the_sweep_ends(at)
    assert job.state == "stopped" and not job.running
    assert [w.value for w in at.warning] == ["Partial sweep: stopped after 1 of 6 points."]
    table = at.dataframe[0].value
    assert 0 < len(table) == len(job.points) < job.planned and table.partial.all()
    assert len(at.get("plotly_chart")) == 2
    assert set(tuning._SWEEPS) == cached_before  # asked again, a partial sweep is computed again


def test_the_previous_sweep_stays_drawn_while_a_new_one_runs_and_after_it_is_stopped_empty(monkeypatch):
    import threading
    from sparse_core import tuning
    at = _ok(_app())
    _ok(at.switch_page("pages/quality.py").run())
    _until_the_sweep_ends(_sweep_topk(at, 0.3))
    first = at.dataframe[0].value
    assert len(first) == 1 and len(at.get("plotly_chart")) == 2

    release = threading.Event()
    real_measured = tuning.measured

    def held(model, spec, **kwargs):  # the new sweep's first point waits for the Stop
        release.wait(timeout=300)
        kwargs["progress"](1, 4)
        return real_measured(model, spec, **kwargs)
    monkeypatch.setattr(tuning, "measured", held)
    try:
        at.multiselect[2].set_value([0.45])
        next(b for b in at.button if b.label == "Run sweep").click()
        _ok(at.run())
        assert at.session_state["sweep_job"].running
        assert "Below: the previous sweep, until this one finishes." in [c.value for c in at.caption]
        assert len(at.get("plotly_chart")) == 2 and at.dataframe[0].value.equals(first)
        next(b for b in at.button if b.label == "Stop sweep").click()
        _ok(at.run())
    finally:
        release.set()
    _until_the_sweep_ends(at)
    assert at.session_state["sweep_job"].state == "stopped"
    assert [i.value for i in at.info] == ["The sweep was stopped before its first point was finished; the charts "
                                          "below are the previous sweep."]
    assert len(at.get("plotly_chart")) == 2 and at.dataframe[0].value.equals(first)


def test_a_failed_sweep_says_why_in_one_sentence(monkeypatch):
    """An error inside the background sweep (here a text it cannot evaluate) shows as one sentence, no traceback."""
    from sparse_core import tuning

    def refuse(model, spec, **kwargs):
        raise ValueError("The text is empty; give some text to calibrate or evaluate on.")
    monkeypatch.setattr(tuning, "measured", refuse)
    at = _ok(_app())
    _ok(at.switch_page("pages/quality.py").run())
    _until_the_sweep_ends(_sweep_topk(at, 0.35))
    assert at.session_state["sweep_job"].state == "failed"
    assert [e.value for e in at.error] == ["The text is empty; give some text to calibrate or evaluate on."]
    assert at.info and not at.get("plotly_chart")  # nothing half-drawn


def test_tuner_calibrates_edits_compares_and_applies_to_the_playground():
    from sparse_core import calibrate, metrics
    from pages.common import load_lab
    at = _ok(_app())
    _ok(at.switch_page("pages/tuner.py").run())
    assert at.title[0].value == "Tuner"
    next(b for b in at.button if b.label == "Calibrate uniform 25%").click()
    _ok(at.run())
    assert list(at.session_state["spec_library"]) == ["teal uniform 25%"]
    at.slider(key="target").set_value(0.4)
    _ok(at.run())
    next(b for b in at.button if b.label == "Calibrate uniform 40%").click()
    _ok(at.run())
    summary = at.dataframe[-1].value
    assert list(summary.spec) == ["teal uniform 25%", "teal uniform 40%"]
    assert summary.achieved_sparsity.iloc[1] > summary.achieved_sparsity.iloc[0]
    model = load_lab("SmolLM2-135M-Instruct", "float32", "inputs").model
    measured = metrics.measured(model, calibrate.calibrate(model, "teal", 0.25))  # the Playground's figure
    assert summary.ppl_sparse.iloc[0] == pytest.approx(measured.ppl_sparse, abs=1e-4)
    assert list(summary.protocol) == ["dense-prefill"] * 2
    assert f"Quality measured with {measured.protocol_label}." in [c.value for c in at.caption]

    # edit the 40 % table (layer 0 dense), calibrate it: it is kept, selected, and the page keeps working
    at.selectbox(key="tuner_spec").set_value("teal uniform 40%")
    _ok(at.run())
    editor = at.session_state["editor-teal uniform 40%"]
    at.session_state["editor-teal uniform 40%"] = {**editor, "edited_rows": {0: {g: 0.0 for g in ("attn_in", "attn_out", "mlp_in", "mlp_mid")}}}
    next(b for b in at.button if b.label == "Calibrate the edited table").click()
    _ok(at.run())
    library = at.session_state["spec_library"]
    assert at.selectbox(key="tuner_spec").value == "teal uniform 40% (edited)"
    edited = library["teal uniform 40% (edited)"]
    assert edited.values[0] == (0.0, 0.0, 0.0, 0.0) and edited.targets[1] == library["teal uniform 40%"].targets[1]
    assert {b.label for b in at.button} >= {"Apply to the Playground"} and at.get("download_button")

    next(b for b in at.button if b.label == "Apply to the Playground").click()
    _ok(at.run())
    assert at.session_state["applied_spec"][0] == "teal uniform 40% (edited)"
    _ok(at.switch_page("pages/playground.py").run())
    assert _setting(at).startswith("**Tuner spec “teal uniform 40% (edited)” ·")  # the header names it
    at.slider(key="target").set_value(0.25)
    _ok(at.run())
    skipped = lambda: float(_metric(at, "Reads skipped (measured)").rstrip("%"))
    assert at.sidebar.toggle(key="use_applied").value and 28 <= skipped() <= 33  # the applied spec wins
    at.sidebar.toggle(key="use_applied").set_value(False)
    _ok(at.run())
    assert 17 <= skipped() <= 22  # back to the slider: 25 % of the sparsifiable reads


def test_tuner_greedy_allocation_is_kept_and_selected():
    at = _ok(_app(target=0.3))
    _ok(at.switch_page("pages/tuner.py").run())
    next(b for b in at.button if b.label == "Calibrate greedy 30%").click()
    _ok(at.run())
    assert at.selectbox(key="tuner_spec").value == "teal greedy 30%"
    spec = at.session_state["spec_library"]["teal greedy 30%"]
    assert dict(spec.provenance)["allocation"] == "greedy" and spec.label == "teal greedy 30%"
    targets = [t for row in spec.targets for t in row]
    assert len(set(targets)) > 1  # per layer and group, not uniform


def test_uploads_are_size_limited_and_parsed_never_executed():
    from pages import common
    from sparse_core.spec import SpecError

    class Upload:
        def __init__(self, data: bytes, name="spec.json"):
            self.name, self.size, self._data = name, len(data), data

        def getvalue(self):
            return self._data
    with pytest.raises(SpecError, match="uploads are limited to 1 MiB"):
        common.read_spec(Upload(b" " * (2 << 20)))
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        common.read_spec(Upload(b"\xff\xfe\x00"))
    with pytest.raises(SpecError, match="not valid JSON"):
        common.read_spec(Upload(b"{'__import__': 'os'}"))


def test_with_the_background_preparation_on_the_headline_waits_for_it_and_a_sweep_runs_beside_it(monkeypatch, tmp_path):
    """The app as users run it (SPARSE_LAB_WARMUP on; the compiled step off, as in every app test): this visitor's
    lease makes the preparation work, the headline of a setting not measured yet says what it is doing and fills in
    once it has measured it, and a sweep runs while every preparation holds still."""
    import time
    monkeypatch.setenv("SPARSE_LAB_WARMUP", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing measured yet (the model stays loaded in memory)
    at = _app()
    try:
        _ok(at)
        from sparse_core import metrics
        waiting = [i.value for i in at.info
                   if i.value.startswith(f"Measuring this setting's quality on {metrics.QUALITY_TOKENS:,} held-out")]
        assert waiting and "Now: " in waiting[0] and not [m for m in at.metric if m.label == "Perplexity change"]
        held = at.session_state["choices"].lab  # the visitor's model, as the sidebar resolved it
        prepared = held.preparation()
        assert prepared.leased and not prepared.stopped  # this visitor's lease
        deadline = time.monotonic() + 300
        while not [m for m in at.metric if m.label == "Perplexity change"]:  # AppTest runs no fragment timers
            assert time.monotonic() < deadline and prepared.error is None, prepared.error
            time.sleep(1.0)
            _ok(at.run())
        assert _metric(at, "Perplexity change").startswith("+")
        _ok(at.switch_page("pages/quality.py").run())
        _until_the_sweep_ends(_sweep_topk(at, 0.35))
        assert at.session_state["sweep_job"].state == "finished" and len(at.get("plotly_chart")) == 2
    finally:
        held = at.session_state["choices"].lab
        held.close()  # nothing keeps working beside the tests that follow
        held.preparation().wait(timeout=600)


def test_int8_weights_from_the_sidebar_generate_measure_and_open_every_page(monkeypatch):
    """int8 is a third model: every label says "int8 weights", it generates, its decode speed is measured against
    its own dense, every page opens, and going back to float32 keeps that model."""
    from sparse_core import bench
    monkeypatch.setattr(bench, "DECODE_TOKENS", 4)
    monkeypatch.setattr(bench, "DECODE_REPEATS", 2)
    monkeypatch.setattr(bench, "flag", lambda *args, **kwargs: None)
    shutil.rmtree(bench._DECODES.folder, ignore_errors=True)
    at = _ok(_app())
    at.selectbox(key="dtype").set_value("int8")
    _ok(at.run())
    assert _setting(at) == "**TEAL thresholds at 25% · int8 weights · inputs layout · cpu**"
    at = _generate(at, 4)
    assert any(c.value.startswith("Produced by: TEAL thresholds at 25% · int8 weights · inputs layout · cpu")
               for c in at.caption)
    assert len(_generated(at)) == 2
    assert "<td>int8 weights</td>" in at.session_state["generation"].report  # the report names them too
    next(b for b in at.button if b.label == "Measure decode speed").click()
    _ok(at.run())
    assert _metric(at, "Decode speedup").startswith("×")
    _ok(at.switch_page("pages/speedup.py").run())
    assert any(c.value.startswith("Measured for TEAL thresholds at 25% · int8 weights") for c in at.caption)
    for page in ("heatmaps", "quality", "tuner"):
        _ok(at.switch_page(f"pages/{page}.py").run())
    at.selectbox(key="dtype").set_value("float32")
    _ok(at.switch_page("pages/playground.py").run())
    assert _setting(at) == "**TEAL thresholds at 25% · float32 · inputs layout · cpu**"
