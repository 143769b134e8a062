"""A new visitor's timeline against a freshly started lab, in Debian's Chromium (Playwright): what docs/PERFORMANCE.md's
"A visit, timed" reports. Start the lab first (`make run` in a clean clone, with an empty HOME), then:

    .venv/bin/python docs/visit_timeline.py http://127.0.0.1:8501

Each line printed is one figure, in seconds: from the server's first answer to the first finished generation
(the default prompt, 48 tokens), from each switch (method, target, weights) until Generate can be pressed, from
Generate to the first token of a 20,000-character prompt, and a second visitor's generation while a sweep runs:
its wait for the first token and its rate against the same generation alone. Nothing else may run on the machine.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

LONG = 600_000  # ms: a first visit converts the model and calibrates


def health(url: str) -> float:
    """Seconds until the server answers its health check."""
    started = time.monotonic()
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return time.monotonic() - started
        except OSError:
            time.sleep(0.2)


def idle(page) -> None:
    """Until the page's script run has ended."""
    page.wait_for_timeout(300)
    page.locator("[data-testid=stStatusWidget]").wait_for(state="detached", timeout=LONG)


def generate(page) -> float:
    """Press Generate; seconds until its sparse rate is shown (the run is finished)."""
    started = time.monotonic()
    page.get_by_role("button", name="Generate").first.click()
    page.locator("[data-testid=stMetric]", has_text="Sparse tokens/s").wait_for(timeout=LONG)
    idle(page)
    return time.monotonic() - started


def first_token(page) -> float:
    """Press Generate; seconds until a pane shows text of this run: the texts on the page before it are marked (one
    stays current until the new run starts) and a stale one (greyed once it has, and drawn anew) is never read."""
    page.evaluate("() => document.querySelectorAll('.generated').forEach(e => e.dataset.before = '1')")
    started = time.monotonic()
    page.get_by_role("button", name="Generate").first.click()
    page.wait_for_function("""() => [...document.querySelectorAll('.generated')]
        .some(e => !e.dataset.before && !e.closest('[data-stale="true"]') && e.innerText.trim().length > 0)""",
                           timeout=LONG)
    return time.monotonic() - started


def switched(page, action, shows: str) -> float:
    """Seconds from a sidebar switch until the headline names the new setting (`shows`) and the page is idle, with
    Generate there to press."""
    started = time.monotonic()
    action()
    page.locator(".st-key-headline", has_text=shows).wait_for(timeout=LONG)
    idle(page)
    page.get_by_role("button", name="Generate").first.wait_for(timeout=LONG)
    return time.monotonic() - started


def sparse_rate(page) -> float:
    value = page.locator("[data-testid=stMetric]", has_text="Sparse tokens/s").locator("[data-testid=stMetricValue]")
    return float(value.inner_text())


class Figures(dict):
    """The figures so far, each printed as it is measured (a step that hangs shows where)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key}: {value}", file=sys.stderr, flush=True)


def main(url: str) -> None:
    figures = Figures(server_answers_s=round(health(url), 1))
    answered = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.set_default_timeout(LONG)
        page.goto(url)
        page.get_by_role("button", name="Generate").first.wait_for()
        idle(page)
        generate(page)
        figures["first_generation_after_server_answers_s"] = round(time.monotonic() - answered, 1)
        sidebar = page.locator("[data-testid=stSidebar]")
        for label in ("top-k", "CATS gate", "TEAL thresholds"):
            figures[f"switch_to_{label}_s"] = round(switched(
                page, lambda: sidebar.locator("label", has_text=label).click(), f"{label} at 25%"), 1)
        target = page.locator("[data-testid=stSlider]", has_text="Inputs skipped").locator("input[type=range]")
        figures["switch_target_s"] = round(switched(page, lambda: (target.focus(), target.press("ArrowRight")),
                                                    "TEAL thresholds at 30%"), 1)
        for dtype, shows in (("bfloat16", "bfloat16"), ("int8", "int8 weights"), ("float32", "float32")):
            def choose(dtype=dtype):
                sidebar.locator("[data-testid=stSelectbox]", has_text="Weights").click()
                page.get_by_role("option", name=dtype, exact=True).click()
            figures[f"switch_to_{dtype}_s"] = round(switched(page, choose, f"TEAL thresholds at 30% · {shows}"), 1)
        page.get_by_label("Prompt").fill(("The history of the lighthouse keeper's island, told slowly. " * 400)[:20_000])
        page.get_by_label("Prompt").press("Tab")
        idle(page)
        figures["long_prompt_first_token_s"] = round(first_token(page), 1)
        page.locator("[data-testid=stMetric]", has_text="Sparse tokens/s").wait_for()
        idle(page)

        page.get_by_label("Prompt").fill("What is the capital of France, and what is it famous for?")
        page.get_by_label("Prompt").press("Tab")
        idle(page)
        generate(page)
        solo = sparse_rate(page)
        other = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
        other.set_default_timeout(LONG)
        other.goto(url)
        other.locator("[data-testid=stSidebarNav] a", has_text="Quality").click()
        other.get_by_role("button", name="Run sweep").click()
        other.get_by_text("Sweeping…").first.wait_for()
        time.sleep(3)  # the sweep is into its first point: a measurement, not a test
        figures["second_visitor_first_token_during_sweep_s"] = round(first_token(page), 1)
        page.locator("[data-testid=stMetric]", has_text="Sparse tokens/s").wait_for()
        idle(page)
        figures["second_visitor_rate_during_sweep_vs_alone"] = round(sparse_rate(page) / solo, 2)
        other.get_by_role("button", name="Stop sweep").click()
        browser.close()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8501")
