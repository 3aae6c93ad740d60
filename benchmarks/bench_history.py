"""History benchmark (ui.history): prints figures, asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_history.py [--rounds 4] [--sessions 200] [--no-browser]

1. What storing a round adds to a round: tiny-sdxl Refine rounds through the studio's own round path
   (`ui.handlers.Studio.refine`, scored as in the app), each followed by what the page does anyway (its
   PNG for the page, `ui.image_files.png_file`) and then by the store's write (`HistoryStore.save`: PNG
   copied atomically, thumbnail, one transaction, retention). Rounds alternate without and with the store,
   so both see the same machine load. Also the write alone for a 1024x1024 round (the real presets' size).
2. The History panel with `--sessions` stored sessions of one browser: the server's listing (query plus
   thumbnails for the page; first call and later calls), and in headless Chromium (when /usr/bin/chromium
   exists) a reload until the panel says how many sessions there are, and opening the panel until every
   thumbnail has loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

PROMPT = "A green banana and a brown horse."
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def bench_round_cost(rounds: int, data: Path) -> None:
    import torch
    from PIL import Image

    from img_core.session import IMGSession
    from ui.handlers import Studio
    from ui.history import HistoryStore, new_browser_id
    from ui.image_files import png_file
    from ui.models import ModelHost
    from ui.state import RoundRequest, StudioState

    torch.set_num_threads(1)  # steadier timings on a shared CPU
    session = IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False).load()
    studio = Studio(ModelHost(session))
    store = HistoryStore(data / "rounds")
    browser = new_browser_id()
    request = RoundRequest.from_values(prompt=PROMPT, seed=0)
    state = studio.generate(request, StudioState())
    png_file(state.base_round().image)
    store.save(browser, state.session_id, state.rounds, state.base, png_file=png_file)
    studio.refine(request, state, None)  # warm-up round

    plain, stored, writes = [], [], []
    for step in range(2 * rounds):
        with_store = step % 2 == 1
        start = time.perf_counter()
        state = studio.refine(request, state, None)
        png_file(state.base_round().image)  # the page's own PNG of the new base (written without a store too)
        made = time.perf_counter()
        if with_store:
            store.save(browser, state.session_id, state.rounds, state.base, png_file=png_file)
            writes.append(time.perf_counter() - made)
            stored.append(time.perf_counter() - start)
        else:
            plain.append(made - start)
    round_seconds, write_seconds = statistics.median(plain), statistics.median(writes)
    print(f"1. tiny-sdxl Refine round (median of {rounds}; {state.base_round().image.size[0]} px images):")
    print(f"   without the store: {round_seconds:.3f} s   with the store: {statistics.median(stored):.3f} s")
    print(f"   the store's write: {milliseconds(write_seconds)} median, {milliseconds(max(writes))} max "
          f"= {100 * write_seconds / round_seconds:.2f} % of the round (target < 5 %)")

    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    first = state.rounds[0]
    big_state = StudioState().started(dataclasses.replace(first, image=big))
    times = []
    for index in range(1, 4):
        big_state = big_state.extended(dataclasses.replace(first, image=big.rotate(90 * index)))
        png_file(big_state.base_round().image)
        start = time.perf_counter()
        store.save(browser, big_state.session_id, big_state.rounds, big_state.base, png_file=png_file)
        times.append(time.perf_counter() - start)
    print(f"   a 1024x1024 round's write (PNG copied, thumbnail, transaction): {milliseconds(statistics.median(times))}"
          " median of 3")
    store.close()


def fill_history(store, browser: str, sessions: int) -> None:
    from PIL import Image

    from img_core.record import Round
    from ui.history import new_session_id

    rng = np.random.default_rng(1)
    for number in range(sessions):
        rounds = []
        for index in range(3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            rounds.append(Round(index=index, image=Image.fromarray(pixels), prompt=f"Session {number}: {PROMPT}",
                                seed=number, source="generated" if index == 0 else "refined",
                                base_index=None if index == 0 else index - 1, scores={"vqascore": 0.5}))  # fmt: skip
        store.save(browser, new_session_id(), rounds, base=2)


def bench_panel(sessions: int, data: Path, browser_too: bool) -> None:
    import gradio as gr

    from ui.history import HistorySettings, HistoryStore, new_browser_id
    from ui.history_panel import HistoryPanel

    store = HistoryStore(data / "panel", HistorySettings(max_sessions=sessions))
    browser = new_browser_id()
    start = time.perf_counter()
    fill_history(store, browser, sessions)
    print(f"2. History panel with {sessions} sessions of 3 rounds (written in {time.perf_counter() - start:.1f} s):")
    with gr.Blocks():
        panel = HistoryPanel(None, store)
        panel.build()
    for label in ("first listing (thumbnails copied for the page)", "later listing"):
        start = time.perf_counter()
        listed = panel.listing(browser)
        print(f"   server, {label}: {milliseconds(time.perf_counter() - start)} ({len(listed[panel.ids])} sessions)")
    start = time.perf_counter()
    store.sessions(browser)
    print(f"   the query alone: {milliseconds(time.perf_counter() - start)}")
    store.close()
    if browser_too:
        bench_panel_in_browser(sessions, data)


def bench_panel_in_browser(sessions: int, data: Path) -> None:
    """A real page: Generate once (the browser's id reaches the store), add sessions for that id, reload."""
    import socket

    from playwright.sync_api import sync_playwright

    import ui
    from img_core.session import IMGSession
    from ui.history import HistorySettings, HistoryStore

    store = HistoryStore(data / "browser", HistorySettings(max_sessions=sessions))
    demo = ui.build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False), history=store)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **ui.launch_kwargs())  # fmt: skip
    demo.studio_ui.preparation.wait()
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate-btn").click()
            page.on("console", lambda message: print("   console:", message.text))
            try:
                page.locator("#history-panel").get_by_text("History (1 session)").wait_for()
            except Exception:
                page.screenshot(path="/tmp/bench-history-failure.png", full_page=True)
                print(page.locator("#history-panel").inner_text(), page.locator("#status").inner_text())
                raise
            (browser,) = [row[0] for row in store._query("SELECT DISTINCT browser FROM sessions")]
            start = time.perf_counter()
            page.reload()
            page.locator("#history-panel").get_by_text("History (1 session)").wait_for()
            baseline = time.perf_counter() - start
            fill_history(store, browser, sessions - 1)
            label = f"History ({sessions} sessions)"
            start = time.perf_counter()
            page.reload()
            page.locator("#history-panel").get_by_text(label).wait_for()
            loaded = time.perf_counter() - start
            start = time.perf_counter()
            page.locator("#history-panel").get_by_text(label).click()
            page.wait_for_function(  # thumbnails load lazily: every item present, those in view loaded
                "(count) => { const images = [...document.querySelectorAll('#history-gallery .gallery-item img')];"
                " const shown = images.filter(i => { const r = i.getBoundingClientRect();"
                " return r.bottom > 0 && r.top < window.innerHeight; });"
                " return images.length === count && shown.length > 0 && shown.every(i => i.complete && i.naturalWidth > 0); }",
                arg=sessions,
            )
            opened = time.perf_counter() - start
            print(f"   Chromium: reload until the panel lists 1 session: {baseline:.2f} s; {sessions} sessions: "
                  f"{loaded:.2f} s")
            print(f"   opening the panel until "
                  f"its {sessions} items are there and the thumbnails in view show: {opened:.2f} s")
            chromium.close()
    finally:
        demo.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds without and with the store (each)")
    parser.add_argument("--sessions", type=int, default=200, help="stored sessions for the panel's load time")
    parser.add_argument("--browser-only", action="store_true", help="only the Chromium measurement")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with tempfile.TemporaryDirectory(prefix="img-history-bench-") as folder:
        if args.browser_only:
            bench_panel_in_browser(args.sessions, Path(folder))
            return
        bench_round_cost(args.rounds, Path(folder))
        bench_panel(args.sessions, Path(folder), browser_too=CHROMIUM.exists() and not args.no_browser)


if __name__ == "__main__":
    main()
