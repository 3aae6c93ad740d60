"""The page in a real headless Chromium (Debian's `chromium`, driven by playwright's Python package), on
the tiny preset: every case of "the studio as people use it". One app server for the module (its models
load in the background once the first page opens); each test opens its own tab (its own rounds) and saves
a screenshot under tests/artifacts/ for a reviewer to look at."""

import io
import os
import socket
import zipfile
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
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PROMPT = "A robot penguin wearing a top hat and playing a vintage trumpet under a rainbow."
TIMEOUT_MS = 90_000
UPLOAD_LIMIT = "100kb"  # the test server's upload limit (the app's is 25 MB): a 200 kB file is over it

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: install the Debian package `chromium` (.ci/run does)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_root):
    """(url, StudioUI) of one server; its models are not loaded until the first page asks."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import ui
    from img_core.session import IMGSession

    demo = ui.build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False),
                         prepare_models=False)  # fmt: skip
    kwargs = {**ui.launch_kwargs(), "max_file_size": UPLOAD_LIMIT}
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **kwargs)  # fmt: skip
    yield url, demo.studio_ui
    demo.close()


@pytest.fixture(scope="module")
def browser(app, tmp_path_factory):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # fresh user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        yield context
        context.close()


def open_page(browser, url, viewport=None):
    page = browser.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def idle(page) -> None:
    """Wait until no job runs in this tab (Generate usable again, Stop not) and the models are ready."""
    from playwright.sync_api import expect

    expect(page.locator("#generate-btn")).to_be_enabled()
    expect(page.locator("#generate-btn")).to_have_text("Generate")
    expect(page.locator("#stop-btn")).to_be_disabled()


def cards(page):
    return page.locator("#round-strip .round-card")


def expect_cards(page, count: int) -> None:
    from playwright.sync_api import expect

    expect(cards(page)).to_have_count(count)
    expect(page.locator(f"#round-image-{count - 1} img")).to_be_visible()


def toast(page, text: str):
    from playwright.sync_api import expect

    message = page.locator(".toast-body").filter(has_text=text).last
    expect(message).to_be_visible()
    return message


def close_toasts(page) -> None:
    page.evaluate("() => document.querySelectorAll('.toast-close').forEach(b => b.click())")


def set_prompt(page, text: str) -> None:
    page.locator("#prompt textarea").fill(text)


def set_number(page, elem_id: str, value: str) -> None:
    """Type into a slider's number box; Gradio takes it when the box loses focus. Typed again if the box
    drops it: an accordion renders its content when first opened, and a box typed into while it is being
    mounted shows the old value again (seen in CI: steps stayed 4 after 200 was typed)."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]")
    expect(box).to_be_visible()
    for _ in range(3):
        box.fill(value)
        box.press("Enter")
        box.blur()
        try:
            expect(box).to_have_value(value, timeout=5_000)
            return
        except AssertionError:
            page.wait_for_timeout(500)
    expect(box).to_have_value(value)


def click(page, button: str) -> None:
    page.locator(f"#{button}-btn").click()


def run_critique(page) -> str:
    """Click Critique (the box must be empty) and wait for its job to end; returns the critique. `idle` alone
    can pass before the click's job has even started, so the streamed text is waited for first."""
    from playwright.sync_api import expect

    box = page.locator("#critique textarea")
    expect(box).to_have_value("")
    click(page, "critique")
    expect(box).not_to_have_value("")
    idle(page)
    return box.input_value()


def expect_base(page, index: int) -> None:
    """Round `index`'s card is the one highlighted as the base (the strip re-renders after the state)."""
    from playwright.sync_api import expect

    expect(page.locator("#round-strip .round-card.is-base")).to_have_attribute("id", f"round-card-{index}")


def test_page_shows_at_once_while_models_prepare(app, browser):
    from playwright.sync_api import expect

    url, studio_ui = app
    assert not studio_ui.host.is_loaded, "run this test first: it needs models that are not loaded yet"
    page = open_page(browser, url)
    generate = page.locator("#generate-btn")
    expect(generate).to_contain_text("preparing models (")
    expect(generate).to_be_disabled()
    expect(page.locator("#status")).to_contain_text("Preparing models")
    expect(page.locator("#refine-btn")).to_be_disabled()  # nothing to refine yet
    expect(page.locator("#tiny-banner")).to_contain_text("Tiny random models")
    expect(page.locator("#models-panel")).to_have_count(0)  # no model switch without --allow-model-switch
    screenshot(page, "preparing")
    idle(page)  # models ready: Generate says Generate and can run
    expect(page.locator("#status")).to_contain_text("loaded in")
    assert studio_ui.host.is_loaded
    page.close()


def test_bad_inputs_never_lock_the_page(app, browser, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, app[0])
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    click(page, "refine")
    expect_cards(page, 2)
    idle(page)

    for prompt, button in [("", "generate"), ("   ", "critique"), ("  \n ", "refine")]:
        set_prompt(page, prompt)
        click(page, button)
        toast(page, "prompt is empty")
        idle(page)
        expect_cards(page, 2)  # the earlier rounds stay
        close_toasts(page)

    set_prompt(page, PROMPT)
    page.get_by_text("Start from your own image").click()
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture")
    page.locator("#upload-image input[type=file]").set_input_files(str(fake))
    expect(page.locator("#upload-image")).to_contain_text("notes.png")
    click(page, "use-upload")
    toast(page, "not an image")
    idle(page)
    expect_cards(page, 2)
    close_toasts(page)

    page.locator("#upload-image button[aria-label='Clear']").first.click()
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(200_000))
    page.locator("#upload-image input[type=file]").set_input_files(str(huge))
    toast(page, "exceed")  # Gradio refuses it before it reaches the app
    click(page, "use-upload")
    toast(page, "no image was uploaded")
    idle(page)
    expect_cards(page, 2)
    close_toasts(page)

    click(page, "refine")  # the next valid click works, in the same tab
    expect_cards(page, 3)
    idle(page)
    expect(page.locator("#round-card-2")).to_contain_text("from round 1")
    expect_base(page, 2)

    set_prompt(page, "fox " * 1250)  # 5,000 characters: cut with a warning, never refused
    click(page, "generate")
    toast(page, "were cut")
    expect_cards(page, 1)
    idle(page)
    screenshot(page, "bad-inputs-then-generate")
    page.close()


def test_strip_preview_refine_from_here_and_download(app, browser):
    from playwright.sync_api import expect

    from ui.files import app_subfolder

    zips_before = sorted(app_subfolder("exports").rglob("*.zip"))
    page = open_page(browser, app[0])
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    expect(page.locator("#next-use")).to_contain_text("uses the question:")  # question mode (the paper's)
    run_critique(page)  # streamed into the editable box
    page.get_by_text("Advanced settings").click()
    page.locator("#guidance-mode").get_by_text("dialogue", exact=True).click()
    page.locator("#critique textarea").fill("")
    page.locator("#critique textarea").press_sequentially("Add a brown horse.")  # typed, as a user does
    expect(page.locator("#next-use")).to_contain_text("uses the critique as edited: “Add a brown horse.”")
    for made in (2, 3, 4):
        click(page, "refine")
        expect_cards(page, made)
        idle(page)
    card = page.locator("#round-card-3")
    expect(card).to_contain_text("Round 3 · from round 2 · seed 0")
    expect(card).to_contain_text("vqascore")
    expect(page.locator("#round-strip")).to_contain_text("★ best round")
    card.get_by_text("Critique it was made from").click()
    expect(card).to_contain_text("Question:")
    page.locator("#round-card-1").get_by_text("Critique it was made from").click()
    expect(page.locator("#round-card-1")).to_contain_text("(steered this round): Add a brown horse.")
    assert page.locator("#round-image-0 img").bounding_box()["height"] >= 250  # a useful size
    expect_base(page, 3)
    expect(page.locator("#current-image")).to_contain_text("Round 3: base of the next round")

    assert sorted(app_subfolder("exports").rglob("*.zip")) == zips_before, "rounds are never zipped until Download"
    with page.expect_download() as download_info:  # one click: every round so far
        click(page, "download")
    with zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes())) as bundle:
        assert sorted(bundle.namelist()) == ["round_0.png", "round_1.png", "round_2.png", "round_3.png", "session.json"]

    page.locator("#round-image-0 img").click()  # previewing a card ...
    page.locator("#round-image-0 button[aria-label='Fullscreen']").click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)  # what a preview would have changed by now
    expect_base(page, 3)  # ... never changes the base
    expect(page.locator("#current-image")).to_contain_text("Round 3")
    screenshot(page, "strip-four-rounds")

    page.locator("#refine-from-1").click()  # "Refine from here" does
    expect(page.locator("#current-image")).to_contain_text("Round 1: base of the next round")
    expect_base(page, 1)
    click(page, "refine")
    expect_cards(page, 5)
    expect(page.locator("#round-card-4")).to_contain_text("from round 1")
    idle(page)
    page.close()


def test_stop_keeps_the_finished_rounds(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app[0])
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    set_number(page, "auto-rounds", "5")
    page.locator("#stop-rule input[type=checkbox]").uncheck()
    page.get_by_text("Advanced settings").click()
    slider, shown = page.locator("#steps input[type=range]"), page.locator("#steps input[type=number]")
    slider.focus()
    for _ in range(80):  # at least 30 steps: slow rounds, so Stop lands mid-run
        if int(shown.input_value()) >= 30:
            break
        slider.press("ArrowRight")
    page.wait_for_timeout(300)
    steps = shown.input_value()
    click(page, "auto-refine")
    expect(page.locator("#status")).to_contain_text(" of 5 · ")  # "round k of 5 · ..."
    expect(page.locator("#status")).to_contain_text(f"/{steps}")  # "... regenerating step i/N"
    expect_cards(page, 2)  # the first round is done
    expect(page.locator("#stop-btn")).to_be_enabled()
    expect(page.locator("#refine-from-0")).to_be_disabled()  # held while the job runs
    click(page, "stop")
    toast(page, "Stopped")
    idle(page)
    expect(page.locator("#refine-from-0")).to_be_enabled()  # and free again after it
    finished = cards(page).count()
    assert 2 <= finished < 6, finished
    expect(page.locator("#status")).to_contain_text("Stopped")
    screenshot(page, "stopped-auto-refine")
    page.close()


def test_phone_sees_the_result_after_generate(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app[0], viewport={"width": 390, "height": 844})
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    expect(page.locator("#round-card-0")).to_be_in_viewport()  # the page scrolls the newest round into view
    expect(page.locator("#status")).to_be_in_viewport()
    page.screenshot(path=str(ARTIFACTS / "phone-after-generate.png"))  # what the phone shows, not the full page
    page.close()


def test_model_failures_never_lock_the_page(app, browser):
    """Fault injection into the real backend: out of GPU memory (advice for the user) and an unexpected
    error (traceback for the log); each leaves the page usable and the next Refine works."""
    import torch
    from playwright.sync_api import expect

    url, studio_ui = app
    page = open_page(browser, url)
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    backend = studio_ui.host.session.backend
    for failure, message in [
        (torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"), "ran out of memory during 'regenerate'"),
        (RuntimeError("injected failure"), "Refine failed (RuntimeError: injected failure)"),
    ]:
        def fail(*args, failure=failure, **kwargs):
            raise failure

        backend.regenerate = fail  # an instance attribute shadows the method until deleted
        try:
            click(page, "refine")
            toast(page, message)
            idle(page)
        finally:
            del backend.regenerate
        expect(page.locator("#status")).to_contain_text(message)
        expect_cards(page, 1)
        close_toasts(page)
    click(page, "refine")
    expect_cards(page, 2)
    idle(page)
    screenshot(page, "model-failures-then-refine")
    page.close()


def test_edited_critiques_steer_by_default_and_an_untouched_one_keeps_question_mode(app, browser):
    """With the page's default settings (guidance: auto): two different edits of the critique from one base
    give two different images, each card saying it was guided by the edit; the untouched critique gives
    exactly the image of forced question mode (the paper's guidance)."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    page = open_page(browser, app[0])
    idle(page)
    set_prompt(page, PROMPT)
    click(page, "generate")
    expect_cards(page, 1)
    idle(page)
    run_critique(page)
    click(page, "refine")  # round 1: the MLLM's critique, untouched
    expect_cards(page, 2)
    idle(page)
    for made, edit in ((3, "Add a brown horse."), (4, "Make the hat bright red.")):  # rounds 2 and 3
        page.locator("#refine-from-0").click()
        expect_base(page, 0)
        box = page.locator("#critique textarea")
        box.fill("")
        box.press_sequentially(edit)  # typed, as a user does
        expect(page.locator("#next-use")).to_contain_text(edit)
        click(page, "refine")
        expect_cards(page, made)
        idle(page)
    page.get_by_text("Advanced settings").click()
    page.locator("#guidance-mode").get_by_text("question", exact=True).click()
    page.locator("#refine-from-0").click()
    expect_base(page, 0)
    click(page, "refine")  # round 4: forced question mode, the MLLM critiques the base itself
    expect_cards(page, 5)
    idle(page)
    expect(page.locator("#round-card-1")).to_contain_text("MLLM's own reading")
    expect(page.locator("#round-card-2")).to_contain_text("guided by your edit")
    expect(page.locator("#round-card-3")).to_contain_text("guided by your edit")
    screenshot(page, "edits-steer")

    with page.expect_download() as download_info:
        click(page, "download")
    with zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes())) as bundle:
        pixels = {k: np.asarray(Image.open(io.BytesIO(bundle.read(f"round_{k}.png"))).convert("RGB"), dtype=np.int16)
                  for k in range(5)}  # fmt: skip
    assert np.abs(pixels[1] - pixels[4]).max() == 0  # untouched critique == question mode, exactly
    assert np.abs(pixels[2] - pixels[3]).max() > 0  # two edits, two images
    assert np.abs(pixels[2] - pixels[1]).max() > 0  # an edit steers away from the MLLM's own reading
    page.close()
