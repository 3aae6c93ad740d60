"""report.html of `evaluate` in a real headless Chromium (Debian's `chromium`, driven by playwright's Python
package), opened from the file system without a server: the grid, its images and the SVG plots render.
The screenshot is kept under tests/artifacts/ (git-ignored)."""

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
        best_cells = page.locator(".grid td.best").count()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "evaluate_report.png"), full_page=True)
        browser.close()

    assert loaded == [64] * (PROMPTS * (ROUNDS + 1))  # every tiny image decoded from images/*.png
    assert plots == [[320, ROUNDS + 1]] * len(summary["scorers"])  # one plot per scorer, a point per round
    assert best_cells == PROMPTS  # one best round marked per prompt
