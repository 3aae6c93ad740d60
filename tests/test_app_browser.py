"""The page in a real headless Chromium (Debian's `chromium`, driven by playwright's Python package):
load it, click Generate then Refine, wait for both images, keep a screenshot."""

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "A robot penguin wearing a top hat and playing a vintage trumpet under a rainbow."
TIMEOUT_MS = 90_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: install the Debian package `chromium` (.ci/run does)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_root):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import ui
    from img_core.session import IMGSession

    demo = ui.build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu"))
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, **ui.launch_kwargs()
    )
    yield url
    demo.close()


def image_width(page, elem_id: str) -> int:
    return page.evaluate(
        "(id) => { const img = document.querySelector(`#${id} img`); "
        "return img && img.complete ? img.naturalWidth : 0; }",
        elem_id,
    )


def test_generate_then_refine_in_chromium(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(app_url)
            expect(page.locator("#tiny-banner")).to_contain_text("Tiny random models")
            expect(page.locator("#refine-btn")).to_be_disabled()  # nothing to refine yet

            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate-btn").click()
            page.wait_for_function("() => { const i = document.querySelector('#original-image img'); "
                                   "return i && i.complete && i.naturalWidth > 0; }")  # fmt: skip
            expect(page.locator("#refine-btn")).to_be_enabled()
            expect(page.locator("#model-status")).to_contain_text("loaded in")

            page.locator("#refine-btn").click()
            expect(page.locator("#current-image")).to_contain_text("Round 1")
            expect(page.locator("#round-log")).to_contain_text("refined from round 0")
            expect(page.locator("#refine-btn")).to_be_enabled()
            page.wait_for_function("() => { const i = document.querySelector('#current-image img'); "
                                   "return i && i.complete && i.naturalWidth > 0; }")  # fmt: skip

            page.locator("#download-btn").click()
            expect(page.locator("#session-zip")).to_contain_text("img-studio-a-robot-penguin")

            screenshot = tmp_path / "img-studio.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert image_width(page, "original-image") > 0 and image_width(page, "current-image") > 0
            original_src = page.locator("#original-image img").get_attribute("src")
            assert original_src != page.locator("#current-image img").get_attribute("src")
            assert page.locator("#rounds-gallery img").count() >= 2
            assert screenshot.stat().st_size > 10_000
            if os.environ.get("IMG_SCREENSHOT_DIR"):  # keep a copy to look at
                shutil.copy(screenshot, Path(os.environ["IMG_SCREENSHOT_DIR"]) / screenshot.name)

            page.locator("#rounds-gallery .thumbnail-item").first.click()  # round 0 becomes the base again
            expect(page.locator("#current-image")).to_contain_text("Round 0: base of the next round")
            expect(page.locator("#current-image img")).to_have_attribute("src", original_src)
        finally:
            browser.close()
