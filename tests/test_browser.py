"""The dashboard in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`.

Playwright never downloads a browser here. Without /usr/bin/chromium the test is skipped, except in CI
(SPARSE_LAB_CI=1, where .ci/run installs it), where a missing browser is a failure.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from pages.common import PRESETS

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
FIRST_LOAD_MS = 420_000  # the first page load calibrates TEAL and measures its quality on 2 (maybe busy) cores
STEP_MS = 240_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`streamlit run app.py` on a free localhost port, headless, its log kept under tests/artifacts/."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: install Debian's chromium (`make browser`) to run the browser test."
        if os.environ.get("SPARSE_LAB_CI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    log = open(ARTIFACTS / "streamlit.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address=127.0.0.1", f"--server.port={port}",
         "--server.headless=true", "--browser.gatherUsageStats=false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start; see {ARTIFACTS / 'streamlit.log'}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    """Debian's Chromium, headless, with nothing that reaches the network on its own; one per module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                           "--disable-component-update", "--no-first-run"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser):
    tab = browser.new_page(viewport={"width": 1400, "height": 2200})
    tab.set_default_timeout(STEP_MS)
    try:
        yield tab
    finally:
        tab.screenshot(path=ARTIFACTS / "last_state.png")  # where the test stopped, pass or fail
        tab.close()


def _settle(page) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_timeout(500)
    page.locator("[data-testid=stStatusWidget]").wait_for(state="detached")


def _generate(page) -> None:
    """Press Generate once the page is idle. While a run redraws the page, an element whose position moved (an
    emptied progress bar before it, gone in the next run) shows twice until the run ends, the old one greyed: both
    are the same widget, and the first is pressed."""
    _settle(page)
    page.get_by_role("button", name="Generate").first.click()


def _metric(page, label: str):
    return page.locator("[data-testid=stMetric]", has_text=label).locator("[data-testid=stMetricValue]")


def _slider(page, label: str):
    return page.locator("[data-testid=stSlider]", has_text=label).locator("input[type=range]")


# The columns of the live heatmap the current script run drew. A chart left from an earlier run stays on the page
# until this run replaces it, current until this run starts and greyed (its container marked data-stale) after:
# charts drawn before a Generate are marked (MARK_CHARTS) and never read, nor is a stale one.
MARK_CHARTS = "() => document.querySelectorAll('.js-plotly-plot').forEach(e => e.dataset.before = '1')"
LIVE_COLUMNS = """() => {
    const chart = [...document.querySelectorAll('.js-plotly-plot')]
        .filter(e => !e.dataset.before && !e.closest('[data-stale="true"]'))
        .find(e => e.layout && e.layout.title && String(e.layout.title.text).includes('Skipped in each decode step'));
    const z = chart && chart.data.length ? chart.data[0].z : null;  // plotly may keep it as {bdata, shape}
    if (!z) return 0;
    if (z.shape) return Number(String(z.shape).split(',')[1] || 0);
    return z.length && z[0] && z[0].length !== undefined ? z[0].length : 0;
}"""


def _sparse_text(page) -> str:
    texts = page.locator(".generated").all_inner_texts()
    return texts[1] if len(texts) == 2 else ""


def _slide(page, label: str, keys: list[str], accept) -> str:
    """Press `keys` on the slider until its value satisfies `accept` (a key press that lands while Streamlit reruns
    can be lost; the whole sequence is retried, three times at most); the value it lands on."""
    slider = _slider(page, label)
    for _ in range(3):
        slider.focus()
        for key in keys:
            slider.press(key)
        _settle(page)
        # The slider sends its value after a debounce, and a rerun still in flight can redraw it with the server's
        # older value: read it only once a second wait has let both land (once, after a read between 2 and 10, the
        # next Generate made a single token).
        page.wait_for_timeout(700)
        _settle(page)
        if accept(slider.input_value()):
            break
    return slider.input_value()


def _download_report(page, name: str) -> str:
    """Press "Download report" and read the file the browser saves (it must come, every time)."""
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Download report").click()
    path = ARTIFACTS / name
    download.value.save_as(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("Plotly.newPlot(") == 3
    return text


def test_every_page_in_a_real_browser(server, browser, page):
    page.goto(server)
    _metric(page, "Perplexity change").wait_for(timeout=FIRST_LOAD_MS)  # TEAL 25 % calibrated, its quality measured
    _settle(page)
    page.locator(".st-key-headline").screenshot(path=ARTIFACTS / "headline_card.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Heatmaps").click()  # first visit: no generation yet
    page.get_by_role("heading", name="Heatmaps").wait_for()
    _settle(page)
    expect(page.locator(".js-plotly-plot")).to_have_count(6, timeout=STEP_MS)  # the example text, traced
    page.screenshot(path=ARTIFACTS / "heatmaps_first_visit.png")
    page.locator("[data-testid=stSidebarNav] a", has_text="Playground").click()
    page.get_by_role("heading", name="Playground").wait_for()
    _settle(page)

    page.locator("[data-testid=stSidebar] label", has_text="top-k").click()
    _settle(page)
    assert _slide(page, "Inputs skipped (target)", ["Home"] + ["ArrowRight"] * 6, lambda v: v == "0.3") == "0.3"
    assert 30 <= int(_slide(page, "Max new tokens", ["Home"] + ["ArrowRight"] * 39, lambda v: 30 <= int(v) <= 48)) <= 48

    page.get_by_label("Prompt").fill(PRESETS["A story"])  # a long answer: the live chart has time to grow
    _generate(page)
    samples, mid_shot = [], False
    deadline = time.monotonic() + STEP_MS / 1000
    while time.monotonic() < deadline:
        done = page.get_by_text("Produced by: top-k at 30%").count() > 0
        samples.append((page.evaluate(LIVE_COLUMNS), len(_sparse_text(page)), done))
        if not done and samples[-1][0] >= 4 and not mid_shot:
            page.screenshot(path=ARTIFACTS / "live_heatmap_mid_generation.png")
            mid_shot = True
        if done:
            break
        page.wait_for_timeout(100)
    growing = [(columns, length) for columns, length, done in samples if not done and columns > 0]
    assert len({columns for columns, _ in growing}) >= 2, samples  # the chart changed while tokens streamed
    assert growing[-1][1] > growing[0][1]  # ... and the text was still growing meanwhile
    _metric(page, "Sparse tokens/s").wait_for()
    _settle(page)
    texts = page.locator(".generated").all_inner_texts()
    assert len(texts) == 2 and all(t.strip() for t in texts)
    page.screenshot(path=ARTIFACTS / "live_heatmap_end.png", full_page=True)

    report = _download_report(page, "report.html")
    assert "top-k at 30%" in report and PRESETS["A story"] in report and "<|im_start|>" not in report
    opened = browser.new_page()  # a second tab: the file itself, offline
    opened.goto((ARTIFACTS / "report.html").as_uri())
    expect(opened.locator(".js-plotly-plot")).to_have_count(3)
    opened.screenshot(path=ARTIFACTS / "report_opened.png", full_page=True)
    opened.close()

    assert _slide(page, "Max new tokens", ["End"], lambda v: v == "256") == "256"  # a long run, then Stop
    _settle(page)
    page.evaluate(MARK_CHARTS)
    _generate(page)
    # Stop once this run has drawn two decode steps: both runs then hold two tokens or more, so the partial result has
    # rates, and its report the speed chart (the previous run's text, still on the page, says nothing of this one).
    page.wait_for_function(f"({LIVE_COLUMNS})() >= 2", timeout=STEP_MS)
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Partial result: the run was stopped after").wait_for()
    _settle(page)
    assert len(page.locator(".generated").all_inner_texts()[1]) > 0  # what it made is kept
    assert "Partial result" in _download_report(page, "report_partial.html")  # the second generation's report
    assert 1 < int(_slide(page, "Max new tokens", ["Home"] + ["ArrowRight"] * 7, lambda v: 1 < int(v) <= 10)) <= 10
    page.get_by_label("Prompt").fill(PRESETS["Translation"])  # a third generation, and its report
    page.get_by_label("Prompt").press("Tab")  # commits the text (a run of its own) before Generate is pressed
    _settle(page)
    _generate(page)
    # The last (partial) result stays on the page, greyed, until this run replaces it: its note going is the sign.
    expect(page.get_by_text("Partial result: the run was stopped after")).to_have_count(0, timeout=STEP_MS)
    _settle(page)
    page.get_by_text("Produced by: top-k at 30%").wait_for()
    assert PRESETS["Translation"] in _download_report(page, "report_third.html")

    page.locator("[data-testid=stSidebarNav] a", has_text="Heatmaps").click()
    page.get_by_role("heading", name="Heatmaps").wait_for()
    _settle(page)
    expect(page.locator(".js-plotly-plot")).to_have_count(6, timeout=STEP_MS)  # four tabs of layers x tokens, neurons, histogram
    page.screenshot(path=ARTIFACTS / "heatmaps.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Speedup").click()
    page.get_by_role("heading", name="Speedup").wait_for()
    _settle(page)
    assert _slider(page, "Inputs skipped (target)").input_value() == "0.3"  # kept across pages
    page.get_by_role("button", name="Time the layers").click()
    page.get_by_text("Produced by: top-k at 30%").wait_for()  # drawn, or flagged on a busy machine: said either way
    _settle(page)
    page.screenshot(path=ARTIFACTS / "speedup.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Quality").click()
    page.get_by_role("heading", name="Quality").wait_for()
    _settle(page)
    page.get_by_role("button", name="Run sweep").click()  # TEAL uniform at 25-60 % on the held-out tokens
    # Each point is drawn as soon as it is measured; Stop keeps the points finished, marked partial.
    expect(page.locator(".js-plotly-plot")).to_have_count(2, timeout=STEP_MS)
    page.screenshot(path=ARTIFACTS / "quality_running.png")
    page.get_by_role("button", name="Stop sweep").click()
    page.get_by_text("Partial sweep: stopped after").first.wait_for()
    expect(page.locator(".js-plotly-plot")).to_have_count(2)
    _settle(page)
    page.screenshot(path=ARTIFACTS / "quality.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Tuner").click()
    page.get_by_role("heading", name="Tuner").wait_for()
    _settle(page)
    page.get_by_role("button", name="Calibrate uniform 30%").click()  # top-k, the sidebar's method: instant
    page.locator("[data-testid=stDataFrame], [data-testid=stDataFrameGlideDataEditor]").first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    _settle(page)
    page.get_by_role("button", name="Apply to the Playground").click()
    page.get_by_text("The Playground now generates with").wait_for()
    page.screenshot(path=ARTIFACTS / "tuner.png")


def test_two_visitors_generating_at_once_each_get_their_own_result(server, browser, smollm2):
    """Two browser contexts are two Streamlit sessions sharing one model: one on top-k, one on TEAL, both press
    Generate together; each sparse pane must hold exactly what the engine generates alone for that setting."""
    from sparse_core import calibrate, generate

    contexts = [browser.new_context(viewport={"width": 1400, "height": 1600}) for _ in range(2)]  # two sessions
    try:
        tabs = [context.new_page() for context in contexts]
        for tab, method in zip(tabs, ["top-k", "TEAL thresholds"]):
            tab.set_default_timeout(STEP_MS)
            tab.goto(server)
            _metric(tab, "Perplexity change").wait_for(timeout=FIRST_LOAD_MS)
            _settle(tab)
            tab.locator("[data-testid=stSidebar] label", has_text=method).click()
            _settle(tab)
            tokens = _slider(tab, "Max new tokens")
            tokens.focus()
            tokens.press("Home")
            _settle(tab)
            for _ in range(5):
                tokens.press("ArrowRight")
            _settle(tab)
        started = time.monotonic()
        for tab in tabs:  # both runs in flight at once
            tab.get_by_role("button", name="Generate").click()
        for tab in tabs:
            _metric(tab, "Sparse tokens/s").wait_for()
            _settle(tab)
        elapsed = time.monotonic() - started
        shown = [tab.locator(".generated").all_inner_texts()[1].strip() for tab in tabs]
        new_tokens = [int(_slider(tab, "Max new tokens").input_value()) for tab in tabs]  # each session's own
        tabs[0].screenshot(path=ARTIFACTS / "two_visitors_topk.png")
        tabs[1].screenshot(path=ARTIFACTS / "two_visitors_teal.png")
    finally:
        for context in contexts:
            context.close()
    specs = (smollm2.topk_spec(0.25), calibrate.calibrate(smollm2, "teal", 0.25))
    expected = [generate.generate(smollm2, PRESETS["Chat question"], spec, max_new_tokens=n).text.strip()
                for spec, n in zip(specs, new_tokens)]
    print(f"two concurrent visitors: {new_tokens} new tokens, both done in {elapsed:.1f} s")
    assert shown == expected
