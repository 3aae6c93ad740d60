"""report.html of `evaluate` in a real headless Chromium (Debian's `chromium`, driven by playwright's Python
package), opened from the file system without a server: the grid, its images and the SVG plots (labelled
axes, intervals) render, and the per-prompt table sorts on a click. The screenshot is kept under
tests/artifacts/ (git-ignored)."""

import json
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPTS = 3
ROUNDS = 2

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium is missing: install the Debian package `chromium` (.ci/run does)"),
    pytest.mark.usefixtures("one_thread"),
]


def test_report_renders_grid_images_and_plots(tiny_root, tmp_path):
    pytest.importorskip("playwright", reason="the browser test needs the playwright package (requirements-dev.txt)")
    from playwright.sync_api import sync_playwright

    from img_core.cli.evaluate import main
    from img_core.evaluation.prompt_sets import COMPOSITIONAL_PROMPTS

    out = tmp_path / "run"
    assert main(["--preset", "tiny-sdxl", "--prompts", str(COMPOSITIONAL_PROMPTS), "--limit", str(PROMPTS),
                 "--rounds", str(ROUNDS), "--steps", "2", "--scorers", "clipscore,hpsv2", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((out / "report.html").as_uri())
        page.wait_for_function("Array.from(document.images).every(img => img.complete)", timeout=30_000)
        loaded = page.evaluate("Array.from(document.querySelectorAll('.grid img')).map(img => img.naturalWidth)")
        plots = page.evaluate("Array.from(document.querySelectorAll('.plots svg')).map(svg => "
                              "[svg.width.baseVal.value, svg.querySelectorAll('circle').length])")
        y_ticks = page.evaluate("Array.from(document.querySelectorAll('.plots svg')).map(svg => "
                                "Array.from(svg.querySelectorAll('.y-tick')).map(t => t.textContent))")
        intervals = page.evaluate("Array.from(document.querySelectorAll('.plots svg')).map(svg => "
                                  "svg.querySelectorAll('.interval').length)")
        best_cells = page.locator(".grid td.best").count()
        column = "hpsv2 change"
        header = page.locator("table.prompts th", has_text=column)
        index = page.evaluate(f"Array.from(document.querySelectorAll('table.prompts th')).findIndex(th => "
                              f"th.textContent.startsWith('{column}'))")
        read_column = (f"Array.from(document.querySelectorAll('table.prompts tbody tr')).map(row => "
                       f"parseFloat(row.cells[{index}].dataset.value))")
        header.click()
        ascending = page.evaluate(read_column)
        header.click()
        descending = page.evaluate(read_column)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "evaluate_report.png"), full_page=True)
        browser.close()

    assert loaded == [64] * (PROMPTS * (ROUNDS + 1))  # every tiny image decoded from images/*.png
    # per scorer a mean plot (a point per round) and a win-rate plot (a point per round >= 1), 360 px wide
    assert plots == [[360, ROUNDS + 1], [360, ROUNDS]] * len(summary["scorers"])
    assert all(len(ticks) >= 3 for ticks in y_ticks)  # the y axes carry values
    assert y_ticks[1] == ["0%", "20%", "40%", "60%", "80%", "100%"]  # win rate: one fixed scale
    assert intervals == [ROUNDS, ROUNDS] * len(summary["scorers"])  # an interval for every round k >= 1
    assert best_cells == PROMPTS  # one best round marked per prompt
    changes = list(ascending)
    assert ascending == sorted(changes) and descending == sorted(changes, reverse=True) and len(changes) == PROMPTS
