"""The studio's habits in a real headless Chromium, on the tiny preset: the newest round and the status
stay in view, a queued job says so and Stop cancels it, no server path reaches the page, and axe-core
finds no critical or serious accessibility issue. Shares the server and browser of test_app_browser.py;
screenshots go to tests/artifacts/."""

import os
import re
from pathlib import Path

import pytest
import test_app_browser
from test_app_browser import (
    ARTIFACTS,
    PROMPT,
    cards,
    click,
    close_toasts,
    expect_cards,
    idle,
    open_page,
    screenshot,
    set_number,
    set_prompt,
    toast,
)

app, browser = test_app_browser.app, test_app_browser.browser  # the same server and browser fixtures

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is missing"),
]

# axe-core's browser build: from IMG_STUDIO_AXE, or `npm install --prefix /tmp/axe axe-core`.
AXE = Path(os.environ.get("IMG_STUDIO_AXE", "/tmp/axe/node_modules/axe-core/axe.min.js"))


def in_viewport(page, selector: str) -> bool:
    """The element's box lies inside the window (getBoundingClientRect), with a pixel of slack."""
    return page.evaluate(
        """(selector) => { const el = document.querySelector(selector); if (!el) return false;
        const r = el.getBoundingClientRect();
        return r.height > 0 && r.top >= -1 && r.left >= -1 && r.bottom <= innerHeight + 1 && r.right <= innerWidth + 1; }""",
        selector,
    )


@pytest.mark.parametrize("viewport", [{"width": 1366, "height": 768}, {"width": 390, "height": 844}])
def test_the_newest_round_and_the_status_stay_in_view(app, browser, viewport):
    from playwright.sync_api import expect

    page = open_page(browser, app[0], viewport=viewport)
    idle(page)
    set_prompt(page, PROMPT)
    page.locator("#prompt textarea").press("Enter")  # Enter generates
    expect_cards(page, 1)
    idle(page)
    for made in (2, 3, 4):
        click(page, "refine")
        expect_cards(page, made)
        idle(page)
        page.wait_for_timeout(1200)  # the page's scroll after a new card has run
        newest = f"#round-card-{made - 1}"
        assert in_viewport(page, newest), f"{newest} is out of view at {viewport}"
        assert in_viewport(page, "#status-bar"), f"the status is out of view at {viewport}"
    expect(page.locator("#stop-btn")).to_be_in_viewport()
    name = f"in-view-{viewport['width']}x{viewport['height']}"
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))  # the window as the user sees it
    page.close()


def test_shift_enter_adds_a_line_to_the_prompt(app, browser):
    page = open_page(browser, app[0])
    idle(page)
    box = page.locator("#prompt textarea")
    box.fill("a green banana")
    box.press("Shift+Enter")
    box.press_sequentially("and a brown horse")
    assert box.input_value() == "a green banana\nand a brown horse"
    page.wait_for_timeout(500)
    assert page.locator("#round-strip .round-card").count() == 0, "Shift+Enter started a job"
    page.close()


def test_a_queued_job_shows_its_place_and_stop_cancels_it(app, browser):
    """Tab A runs a long Auto-refine; tab B's Refine waits behind it and says so; Stop in B cancels B's job
    before it runs (B's rounds stay as they were); 'Refine from here' in A during its job is refused with a
    message, never silently overridden."""
    from playwright.sync_api import expect

    first, second = open_page(browser, app[0]), open_page(browser, app[0])
    for page in (first, second):
        idle(page)
        set_prompt(page, PROMPT)
        click(page, "generate")
        expect_cards(page, 1)
        idle(page)
    set_number(first, "auto-rounds", "5")
    first.locator("#stop-rule input[type=checkbox]").uncheck()
    first.get_by_text("Advanced settings").click()
    set_number(first, "steps", "40")  # slow rounds: B waits long enough to be looked at
    click(first, "auto-refine")
    expect(first.locator("#status")).to_contain_text(" of 5 · ")

    click(second, "refine")
    expect(second.locator("#status")).to_contain_text("Waiting in the queue: 1 job ahead of yours")
    expect(second.locator("#stop-btn")).to_be_enabled()
    screenshot(second, "queued-job")
    click(second, "stop")
    toast(second, "Stopped while it waited in the queue")
    idle(second)  # at once, while A still runs
    expect(first.locator("#stop-btn")).to_be_enabled()

    expect_cards(first, 2)
    first.locator("#refine-from-0").click()  # during A's job: refused, with a message
    toast(first, "Refine from here' works once it ends")
    click(first, "stop")
    idle(first)
    made = cards(first).count()
    assert made >= 2
    expect(first.locator(f"#round-card-{made - 1}")).to_have_class(re.compile("is-base"))  # not round 0
    second.wait_for_timeout(1500)  # B's cancelled job has left the queue by now
    expect(cards(second)).to_have_count(1)  # it never ran
    idle(second)
    for page in (first, second):
        close_toasts(page)
        page.close()
