"""Every page through Streamlit's AppTest, with the real embedded model. The model, calibrated specs and quality
numbers are cached in-process, so only the first test pays for loading and calibrating TEAL at 25 %."""
import gc
import weakref

import pytest
from streamlit.testing.v1 import AppTest

TIMEOUT = 300  # seconds per script run; importing torch and the first calibration take a while on 2 cores


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


def _generate(at: AppTest, tokens: int = 8) -> AppTest:
    at.slider(key="max_new_tokens").set_value(tokens)
    next(b for b in at.button if b.label == "Generate").click()
    return _ok(at.run())


def test_playground_renders_with_the_default_model_and_its_quality_cost():
    at = _ok(_app())
    assert at.title[0].value == "Playground"
    assert at.slider(key="target").value == 0.25 and at.radio(key="method_label").value == "TEAL thresholds"
    assert at.sidebar.toggle(key="trust_remote_code").value is False  # remote code is an explicit opt-in
    assert _metric(at, "Skipped (held-out text)").endswith("%")
    assert float(_metric(at, "Perplexity")) > 1
    assert _metric(at, "Speedup bound").startswith("×")


def test_slider_and_method_change_what_is_computed():
    at = _ok(_app())
    teal = _metric(at, "Top-1 agreement"), _metric(at, "Perplexity")
    at.radio(key="method_label").set_value("top-k")
    _ok(at.run())
    topk_25 = _metric(at, "Top-1 agreement"), _metric(at, "Perplexity")
    assert topk_25 != teal
    at.slider(key="target").set_value(0.5)
    _ok(at.run())
    assert _metric(at, "Skipped (held-out text)") == "50%"
    assert float(_metric(at, "Perplexity")) > float(topk_25[1])


def test_generation_fills_both_panes_and_the_details():
    at = _generate(_ok(_app()))
    dense, sparse = _generated(at)
    assert len(dense) > len("<div class='generated'></div>") and len(sparse) > len("<div class='generated'></div>")
    assert float(_metric(at, "Dense tokens/s")) > 0 and float(_metric(at, "Sparse tokens/s")) > 0
    assert at.success or at.warning  # same tokens, or where they diverge
    labels = {m.label for m in at.metric}
    assert "Theoretical bound for this model and sparsity" in labels
    assert len(at.get("plotly_chart")) == 1  # per-layer sparsity of this generation
    cost = at.dataframe[0].value.set_index("per token")
    assert cost.loc["weight bytes read", "sparse"] < cost.loc["weight bytes read", "dense"]
    generation = at.session_state["generation"]
    assert len(generation.tokens["dense"]) <= 8 and generation.achieved > 0.15


def test_user_errors_are_one_sentence_and_the_app_keeps_running():
    at = _ok(_app())
    at.text_area(key="prompt").set_value("   ")
    next(b for b in at.button if b.label == "Generate").click()
    _ok(at.run())
    assert [e.value for e in at.error] == ["The prompt is empty; type something for the model to continue."]

    at.text_input(key="model_name").set_value("no-such-org/no-such-model")
    _ok(at.run())
    assert at.error[0].value.startswith("Could not find model 'no-such-org/no-such-model'")
    assert "Still using SmolLM2-135M-Instruct (float32)." in [c.value for c in at.sidebar.caption]
    assert _metric(at, "Perplexity")  # the page still works on the last model that loaded


def test_heatmaps_page_on_the_last_generation_and_on_pasted_text():
    at = _generate(_ok(_app()))
    _ok(at.switch_page("pages/heatmaps.py").run())
    assert at.title[0].value == "Heatmaps"
    assert len(at.get("plotly_chart")) == 6  # four projection groups, neurons, histogram
    assert any("skipped" in c.value for c in at.caption)

    at.segmented_control(key="heatmap_source").set_value("Pasted text")
    _ok(at.run())
    assert at.info[0].value == "Paste some text to trace it with the current setting."
    at.text_area(key="heatmap_text").set_value("The lighthouse keeper walked along the beach at dawn.")
    _ok(at.run())
    at.slider(key="heatmap_layer").set_value(3)
    _ok(at.run())
    assert len(at.get("plotly_chart")) == 6 and at.subheader[1].value == "MLP neurons of layer 3"
    assert at.session_state["target"] == 0.25  # the sidebar kept its setting across the page change
    trace = weakref.ref(at.session_state["trace"][1])
    del at
    gc.collect()
    assert trace() is None  # the trace lived in that visitor's session only: gone with it


def test_speedup_page_runs_the_benchmarks():
    at = _ok(_app())
    _ok(at.switch_page("pages/speedup.py").run())
    assert at.title[0].value == "Speedup"
    at.multiselect(key="bench_shapes").set_value(["576×1536"])
    at.multiselect(key="bench_dtypes").set_value(["float32"])
    next(b for b in at.button if b.label == "Run kernel benchmark").click()
    _ok(at.run())
    kernels = at.dataframe[0].value
    assert list(kernels["sparsity"]) == [0.0, 0.5, 0.9] and (kernels["speedup"] > 0).all()

    at.button(key="time_layers").click()
    _ok(at.run())
    layers = at.dataframe[1].value
    assert len(layers) == 31 and (layers[["dense_ms", "sparse_ms"]] >= 0).all().all()

    at.slider(key="e2e_tokens").set_value(8)
    at.button(key="e2e").click()
    _ok(at.run())
    assert float(_metric(at, "Dense tokens/s")) > 0 and _metric(at, "Model bound").startswith("×")
    assert len(at.get("plotly_chart")) == 2 and len(at.get("download_button")) == 3


def test_the_cats_layout_is_a_second_model_that_skips_up_rows_under_cats():
    at = _ok(_app(method_label="CATS gate"))
    bound = lambda: float(_metric(at, "Speedup bound").lstrip("×"))
    inputs_bound = bound()
    at.selectbox(key="layout").set_value("cats")
    _ok(at.run())
    assert bound() > inputs_bound  # up's rows now count as skipped reads
    _ok(at.switch_page("pages/speedup.py").run())
    assert not any("inputs** weight layout" in c.value for c in at.caption)
    at.selectbox(key="layout").set_value("inputs")
    _ok(at.run())
    assert any("inputs** weight layout" in c.value for c in at.caption)


def test_quality_page_runs_a_sweep_and_refuses_an_empty_one():
    at = _ok(_app())
    _ok(at.switch_page("pages/quality.py").run())
    assert at.title[0].value == "Quality" and at.info
    at.multiselect[0].set_value([])
    at.button[0].click()  # the form's submit button
    _ok(at.run())
    assert at.error[0].value == "Pick at least one method, one allocation and one target."
    at.multiselect[0].set_value(["TEAL thresholds", "top-k"])
    at.multiselect[2].set_value([0.25, 0.5])
    at.select_slider[0].set_value(128)
    at.button[0].click()
    _ok(at.run())
    sweep = at.session_state["sweep"]
    assert len(sweep) == 4 and set(sweep.method) == {"teal", "topk"}
    assert (sweep[sweep.target == 0.5].ppl_ratio.values > sweep[sweep.target == 0.25].ppl_ratio.values).all()
    assert len(at.get("plotly_chart")) == 2 and len(at.dataframe) == 1


def test_tuner_calibrates_edits_compares_and_applies_to_the_playground():
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

    next(b for b in at.button if b.label == "Apply to the Playground").click()
    _ok(at.run())
    assert at.session_state["applied_spec"][0] == "teal uniform 40%"
    _ok(at.switch_page("pages/playground.py").run())
    at.slider(key="target").set_value(0.25)
    _ok(at.run())
    skipped = lambda: int(_metric(at, "Skipped (held-out text)").rstrip("%"))
    assert at.sidebar.toggle(key="use_applied").value and 38 <= skipped() <= 42  # the applied spec wins
    at.sidebar.toggle(key="use_applied").set_value(False)
    _ok(at.run())
    assert 23 <= skipped() <= 27  # back to the slider


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
