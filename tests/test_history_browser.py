"""Sessions that last, in a real headless Chromium on the tiny preset (issue 16, items 1 and 2): a reload
or a new tab restores the session; the History panel restores and deletes; two browsers (two browser
contexts: separate local storage) see only their own sessions; Generate, an upload and Reset keep the
old session in the History. One app server with a History store in a temporary folder; screenshots under
tests/artifacts/."""

import re

import pytest
from test_app_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PROMPT,
    TIMEOUT_MS,
    click,
    close_toasts,
    expect_base,
    expect_cards,
    free_port,
    idle,
    run_critique,
    screenshot,
    set_prompt,
    toast,
)
from test_app_studio_browser import AXE, run_axe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: install the Debian package"),
]

OTHER_PROMPT = "A blue teapot on a red chair."


@pytest.fixture(scope="module")
def app(tiny_root, tmp_path_factory):
    """(url, HistoryStore) of one server with a History in a temporary data folder."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import ui
    from img_core.session import IMGSession
    from ui.history import HistoryStore

    store = HistoryStore(tmp_path_factory.mktemp("studio-data"))
    demo = ui.build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False), history=store)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **ui.launch_kwargs())  # fmt: skip
    demo.studio_ui.preparation.wait()
    yield url, store
    demo.close()
    store.close()


@pytest.fixture(scope="module")
def chromium(app):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(chromium):
    """One browser profile (its own local storage: its own browser id)."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    yield context
    context.close()


def open_tab(context, url):
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    idle(page)
    return page


def open_history(page):
    from playwright.sync_api import expect

    panel = page.locator("#history-panel")
    if page.locator("#history-gallery").count() == 0 or not page.locator("#history-gallery").is_visible():
        panel.get_by_text(re.compile(r"^History")).first.click()
    expect(page.locator("#history-gallery")).to_be_visible()
    return page.locator("#history-gallery .gallery-item")


def history_captions(page) -> list[str]:
    return [text.strip() for text in page.locator("#history-gallery .caption-label").all_inner_texts()]


def expect_history(page, count: int) -> None:
    from playwright.sync_api import expect

    items = open_history(page)
    expect(items).to_have_count(count)
    expect(page.locator("#history-panel")).to_contain_text(f"History ({count} session")


def generate(page, prompt: str, refines: int = 0) -> None:
    set_prompt(page, prompt)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    for made in range(2, refines + 2):
        click(page, "refine")
        expect_cards(page, made)
        idle(page)


def test_a_reload_and_a_new_tab_restore_the_session(app, context):
    from playwright.sync_api import expect

    url, store = app
    page = open_tab(context, url)
    generate(page, PROMPT, refines=2)
    page.locator("#refine-from-1").click()  # the base is round 1 ...
    expect_base(page, 1)
    critique = run_critique(page)  # ... with its critique in the box
    page.wait_for_timeout(500)  # the critique is stored from the job's last update
    page.reload()
    expect_cards(page, 3)
    expect_base(page, 1)
    expect(page.locator("#critique textarea")).to_have_value(critique)
    expect(page.locator("#prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#current-image")).to_contain_text("Round 1: base of the next round")
    expect(page.locator("#round-card-2")).to_contain_text("from round 1")
    idle(page)
    screenshot(page, "history-after-reload")

    tab = open_tab(context, url)  # a new tab of the same browser
    expect_cards(tab, 3)
    expect_base(tab, 1)
    click(tab, "refine")  # the restored session goes on: round 3 from round 1
    expect_cards(tab, 4)
    idle(tab)
    expect(tab.locator("#round-card-3")).to_contain_text("from round 1")
    tab.wait_for_timeout(300)
    tab.reload()
    expect_cards(tab, 4)
    expect_history(tab, 1)
    assert "4 rounds" in history_captions(tab)[0]
    screenshot(tab, "history-new-tab")

    click(tab, "refine")  # while a round is being made, a restore is refused (its update would be overwritten)
    expect(tab.locator("#status")).to_contain_text("round 4 ·")
    open_history(tab).nth(0).click()
    toast(tab, "A round is being made in this tab")
    expect_cards(tab, 5)
    idle(tab)
    expect_base(tab, 4)


def test_two_tabs_going_on_from_one_session_keep_both(app, context):
    """Both tabs make a round 2 of the same session: the second is kept as a new session, never dropped."""
    from playwright.sync_api import expect

    url, store = app
    first = open_tab(context, url)
    generate(first, PROMPT, refines=1)  # rounds 0 and 1
    second = open_tab(context, url)  # restores the same session
    expect_cards(second, 2)
    idle(second)
    click(first, "refine")  # round 2 from round 1, stored under the session
    expect_cards(first, 3)
    idle(first)
    second.locator("#refine-from-0").click()
    expect_base(second, 0)
    click(second, "refine")  # its own round 2, from round 0: a clash, kept as a new session
    expect_cards(second, 3)
    idle(second)
    toast(second, "Another tab went on from this session")
    expect(second.locator("#round-card-2")).to_contain_text("from round 0")
    expect_history(second, 2)
    assert all("3 rounds" in caption for caption in history_captions(second)[:2])
    screenshot(second, "history-two-tabs")
    second.wait_for_timeout(300)
    second.reload()  # the browser's current session is now the second tab's
    expect_cards(second, 3)
    expect(second.locator("#round-card-2")).to_contain_text("from round 0")
    idle(second)
    open_history(second).nth(1).click()  # the older one: the first tab's session, intact
    expect(second.locator("#round-card-2")).to_contain_text("from round 1")


def test_generate_keeps_the_old_session_and_history_restores_and_deletes(app, context):
    from playwright.sync_api import expect

    url, store = app
    page = open_tab(context, url)
    generate(page, PROMPT, refines=1)
    generate(page, OTHER_PROMPT)  # a new session: the strip shows its one round ...
    expect_cards(page, 1)
    expect_history(page, 2)  # ... and the two-round session stays in the History
    captions = history_captions(page)
    assert OTHER_PROMPT in captions[0] and "1 round" in captions[0]
    assert PROMPT[:40] in captions[1] and "2 rounds" in captions[1]
    screenshot(page, "history-two-sessions")

    open_history(page).nth(1).click()  # one click restores it
    expect_cards(page, 2)
    expect(page.locator("#prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#history-note")).to_contain_text("Selected:")
    expect(page.locator("#history-delete-btn")).to_be_enabled()
    idle(page)
    click(page, "refine")  # and it goes on
    expect_cards(page, 3)
    idle(page)
    expect(page.locator("#history-delete-btn")).to_be_enabled()  # still selected: it moved to the top
    expect(page.locator("#history-gallery .gallery-item button.selected")).to_contain_text("3 rounds")
    screenshot(page, "history-restored")

    expect_history(page, 2)
    index = next(i for i, text in enumerate(history_captions(page)) if "3 rounds" in text)
    open_history(page).nth(index).click()
    expect(page.locator("#history-delete-btn")).to_be_enabled()
    page.locator("#history-delete-btn").click()  # deleting the session on the page empties the page
    expect_history(page, 1)
    expect(page.locator("#round-strip")).to_contain_text("No rounds yet")
    assert OTHER_PROMPT in history_captions(page)[0]
    page.reload()
    expect(page.locator("#round-strip")).to_contain_text("No rounds yet")  # not brought back by a reload
    expect_history(page, 1)

    open_history(page).nth(0).click()
    expect_cards(page, 1)
    idle(page)
    click(page, "reset")  # Reset empties the page; the session stays in the History
    expect(page.locator("#round-strip")).to_contain_text("No rounds yet")
    expect_history(page, 1)
    page.reload()
    expect(page.locator("#round-strip")).to_contain_text("No rounds yet")
    expect_history(page, 1)
    screenshot(page, "history-after-delete-and-reset")


def test_an_upload_keeps_the_old_session_in_the_history(app, context, tmp_path):
    """'Use it as round 0' with rounds on the page starts a new session, as Generate does: the old one
    stays in the History, intact, and a reload shows the new one."""
    from PIL import Image
    from playwright.sync_api import expect

    url = app[0]
    page = open_tab(context, url)
    generate(page, PROMPT, refines=1)
    expect_history(page, 1)
    picture = tmp_path / "my-picture.png"
    Image.new("RGB", (64, 64), (20, 160, 40)).save(picture)
    page.get_by_text("Start from your own image").click()
    page.locator("#upload-image input[type=file]").set_input_files(str(picture))
    expect(page.locator("#upload-image")).to_contain_text("my-picture.png")
    set_prompt(page, OTHER_PROMPT)
    click(page, "use-upload")
    expect_cards(page, 1)  # a new session: the strip shows the uploaded round 0 ...
    idle(page)
    expect(page.locator("#round-card-0")).to_contain_text("your image")
    expect_history(page, 2)  # ... and the two-round session stays in the History
    captions = history_captions(page)
    assert OTHER_PROMPT in captions[0] and "1 round" in captions[0]
    assert PROMPT[:40] in captions[1] and "2 rounds" in captions[1]
    # a new session of its own, not a clash with the old one's round 0 rescued as a fork (whose message
    # comes before the round: it would show now). Counted once: expect() would wait for it to fade.
    assert page.locator(".toast-body").filter(has_text="Another tab went on").count() == 0
    screenshot(page, "history-after-upload")
    page.reload()  # the browser's current session is the upload's
    expect_cards(page, 1)
    expect(page.locator("#round-card-0")).to_contain_text("your image")
    expect(page.locator("#prompt textarea")).to_have_value(OTHER_PROMPT)
    idle(page)
    open_history(page).nth(1).click()  # the old session, intact
    expect_cards(page, 2)
    expect(page.locator("#prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#round-card-1")).to_contain_text("from round 0")
    idle(page)


def test_two_browsers_see_only_their_own_sessions(app, chromium):
    from playwright.sync_api import expect

    url, store = app
    first, second = chromium.new_context(), chromium.new_context()
    try:
        alice, bob = open_tab(first, url), open_tab(second, url)
        generate(alice, "Alice's red fox in the snow.")
        generate(bob, "Bob's yellow submarine.", refines=1)
        expect_history(alice, 1)
        expect_history(bob, 1)
        assert "Alice's red fox" in history_captions(alice)[0]
        assert "Bob's yellow submarine" in history_captions(bob)[0]
        alice.reload()
        expect_cards(alice, 1)
        expect(alice.locator("#prompt textarea")).to_have_value("Alice's red fox in the snow.")
        expect_history(alice, 1)
        bob.reload()
        expect_cards(bob, 2)
        expect_history(bob, 1)
        screenshot(alice, "history-browser-alice")
        screenshot(bob, "history-browser-bob")
        # The server agrees: each browser id owns exactly its own session.
        owners = store._query("SELECT browser, prompt FROM sessions WHERE prompt LIKE 'Alice%' OR prompt LIKE 'Bob%'")
        assert len(owners) == 2 and owners[0][0] != owners[1][0]
        for browser, prompt in owners:
            assert [s.prompt for s in store.sessions(browser)] == [prompt]
    finally:
        first.close()
        second.close()


def test_a_failing_store_never_costs_a_round(app, context):
    """Fault injection into the real store: its writes fail. Every round still shows; one message says
    that the History did not keep them (once, not per round); the next working write stores the session."""
    from playwright.sync_api import expect

    url, store = app
    page = open_tab(context, url)

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    store.save = fail  # an instance attribute shadows the method until deleted
    try:
        generate(page, "A failing disk, a kept round.")
        toast(page, "Saving to your History failed")
        close_toasts(page)
        for made in (2, 3):
            click(page, "refine")
            expect_cards(page, made)
            idle(page)
        expect(page.locator(".toast-body").filter(has_text="Saving to your History failed")).to_have_count(0)
    finally:
        del store.save
    click(page, "refine")  # the store works again: the whole session is written, its first rounds too
    expect_cards(page, 4)
    idle(page)
    page.wait_for_timeout(300)
    page.reload()
    expect_cards(page, 4)
    screenshot(page, "history-after-store-failure")


@pytest.mark.skipif(not AXE.exists(), reason=f"{AXE} is missing: npm install --prefix /tmp/axe axe-core")
def test_axe_finds_no_critical_or_serious_issue_with_the_history_open(app, context):
    """The History panel, open with sessions listed (and one selected), passes axe-core like the rest of the
    page: each thumbnail's name is its visible caption (Gradio names it 'Thumbnail 1 of 2')."""
    from playwright.sync_api import expect

    url = app[0]
    page = open_tab(context, url)
    generate(page, PROMPT)
    expect_history(page, 1)
    page.wait_for_timeout(500)  # the accordion's opening has settled
    found = {"history open, one session": run_axe(page)}
    generate(page, OTHER_PROMPT)  # a second session: the first thumbnail's Gradio name becomes "... of 2"
    expect_history(page, 2)
    open_history(page).nth(1).click()
    expect(page.locator("#history-note")).to_contain_text("Selected:")
    expect_cards(page, 1)
    idle(page)
    page.wait_for_timeout(500)
    found["history open, two sessions, one selected"] = run_axe(page)
    screenshot(page, "history-axe-checked")
    assert found == {name: [] for name in found}, found
    for index, caption in enumerate(history_captions(page)):  # the name a screen reader says is what is shown
        expect(page.locator("#history-gallery .thumbnail-item").nth(index)).to_have_attribute("aria-label", caption)
