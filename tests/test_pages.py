"""The HTML pages people open (evaluate's report.html, search's results.html) in a real
headless browser: Debian's Chromium, driven by Playwright. .ci/run installs Chromium when it
is missing; elsewhere the run says before it starts that these tests will skip (conftest.py).
Every image loads, the console has no errors, and a screenshot is saved."""

import os

import pytest

from delf_index.pipelines import search
from tests.conftest import ONE_WORKER, chromium, missing_here

CHROMIUM = chromium()
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip
# a mark, not a skip in `browser`: fixtures of a wider scope (`evaluated`, a whole evaluation)
# are set up first, for nothing when the browser is missing
MISSING = missing_here().get("browser")
pytestmark = pytest.mark.skipif(MISSING is not None, reason="; to run them: ".join(MISSING or ()))


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, path, screenshot):
    """Load a page from disk: (console errors, failed requests, images, images that did not load)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, failed = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(f"file://{path}", wait_until="load")
    images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    page.screenshot(path=screenshot, full_page=True)
    page.close()
    return errors, failed, [src for src, _ in images], [src for src, ok in images if not ok]


def test_the_evaluation_report_opens_whole(browser, evaluated, tmp_path):
    work, summary = evaluated
    report = os.path.join(work, "eval", "report.html")
    errors, failed, images, broken = open_page(browser, report, str(work / "eval" / "report.png"))
    assert not errors and not failed and not broken, (errors, failed, broken)
    assert "pr.png" in images and len(images) >= 1 + 10 * 2  # the plot, the worst queries and their results
    text = open(report).read()
    assert "fused + verification" in text and "class='good'" in text and "inliers" in text
    assert os.path.getsize(work / "eval" / "report.png") > 10_000


def test_search_results_open_whole(browser, evaluated, corpus, tmp_path):
    summary = search.run(str(corpus / "images"), str(evaluated[0] / "index"), str(tmp_path / "s"), {"top": 3},
                         beam_options=ONE_WORKER)  # fmt: skip
    errors, failed, images, broken = open_page(browser, summary["page"], str(tmp_path / "results.png"))
    assert not errors and not failed and not broken, (errors, failed, broken)
    assert len(images) == summary["queries"] * 4  # each query and its three results
