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


def _metric(page, label: str):
    return page.locator("[data-testid=stMetric]", has_text=label).locator("[data-testid=stMetricValue]")


def _slider(page, label: str):
    return page.locator("[data-testid=stSlider]", has_text=label).locator("input[type=range]")


def test_every_page_in_a_real_browser(server, page):
    page.goto(server)
    _metric(page, "Perplexity").wait_for(timeout=FIRST_LOAD_MS)  # TEAL at 25 % calibrated and its quality measured
    _settle(page)

    page.locator("[data-testid=stSidebar] label", has_text="top-k").click()
    _settle(page)
    target = _slider(page, "Share of inputs skipped")
    target.focus()
    target.press("ArrowRight")  # 25 % -> 30 %
    _settle(page)
    assert target.input_value() == "0.3"
    tokens = _slider(page, "Max new tokens")
    tokens.focus()
    tokens.press("Home")  # 1 token
    _settle(page)
    for _ in range(9):
        tokens.press("ArrowRight")
    _settle(page)
    assert 1 < int(tokens.input_value()) <= 10  # keep the browser test short

    page.get_by_role("button", name="Generate").click()
    _metric(page, "Sparse tokens/s").wait_for()
    _settle(page)
    texts = page.locator(".generated").all_inner_texts()
    assert len(texts) == 2 and all(t.strip() for t in texts)
    page.locator(".js-plotly-plot").first.wait_for()
    page.screenshot(path=ARTIFACTS / "playground.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Heatmaps").click()
    page.get_by_role("heading", name="Heatmaps").wait_for()
    _settle(page)
    expect(page.locator(".js-plotly-plot")).to_have_count(6, timeout=STEP_MS)  # four tabs of layers x tokens, neurons, histogram
    page.screenshot(path=ARTIFACTS / "heatmaps.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Speedup").click()
    page.get_by_role("heading", name="Speedup").wait_for()
    _settle(page)
    assert _slider(page, "Share of inputs skipped").input_value() == "0.3"  # kept across pages
    page.get_by_role("button", name="Time the layers").click()
    page.locator(".js-plotly-plot").first.wait_for()
    _settle(page)
    page.screenshot(path=ARTIFACTS / "speedup.png")

    page.locator("[data-testid=stSidebarNav] a", has_text="Quality").click()
    page.get_by_role("heading", name="Quality").wait_for()
    _settle(page)
    page.get_by_role("button", name="Run sweep").click()  # TEAL uniform at 25-60 % on 256 held-out tokens
    expect(page.locator(".js-plotly-plot")).to_have_count(2, timeout=STEP_MS)
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
    from pages.common import PRESETS

    contexts = [browser.new_context(viewport={"width": 1400, "height": 1600}) for _ in range(2)]  # two sessions
    try:
        tabs = [context.new_page() for context in contexts]
        for tab, method in zip(tabs, ["top-k", "TEAL thresholds"]):
            tab.set_default_timeout(STEP_MS)
            tab.goto(server)
            _metric(tab, "Perplexity").wait_for(timeout=FIRST_LOAD_MS)
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
