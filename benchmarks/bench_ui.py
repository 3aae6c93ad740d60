"""IMG Studio UI benchmark: prints figures, asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ui.py [--preset tiny-sdxl] [--repeats 3] [--no-browser]

Launches `app.py` on a free 127.0.0.1 port, as a user would, and measures:
0. start-up: the page answers at once; the models prepare in the background until the buttons are usable.
1. click -> first progress update: in headless Chromium (when /usr/bin/chromium exists), clicking
   Generate until the status area shows the round's stage; and through gradio_client, until the event's
   first streamed update. The first click and later (warm) ones.
2. one round through the UI (gradio_client -> the app's own Generate / Refine events, and the stateless
   /refine endpoint) vs the same round through img_core in this process: the difference is the UI's
   overhead (queue, (de)serialisation, PNG encoding, HTTP).
3. second vs first round through the UI: the models were prepared at start-up; nothing reloads later.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

PROMPT = "A green banana and a brown horse."
SEED = 0
CRITIQUE = "The horse is missing: add a brown horse next to the green banana."
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(preset: str, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    command = [sys.executable, "app.py", "--preset", preset, "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)


def ui_args(client, api_name: str, **values) -> list:
    """Positional arguments for one of the UI's own (undocumented) events, from widget elem_ids."""
    config = client.config
    event = next(d for d in config["dependencies"] if d.get("api_name") == api_name.lstrip("/"))
    components = {c["id"]: c for c in config["components"]}
    args = []
    for component_id in event["inputs"]:
        component = components[component_id]
        if component["type"] != "state":
            name = (component["props"].get("elem_id") or "").replace("-", "_")
            args.append(values.get(name, component["props"].get("value")))
    return args


def timed_job(client, args: list, api_name: str) -> tuple[float | None, float, list]:
    """(seconds to the first streamed update, seconds to the end, every update) of one submitted call."""
    start = time.perf_counter()
    job = client.submit(*args, api_name=api_name)
    first_progress = None
    while not job.done():
        if first_progress is None and job.outputs():
            first_progress = time.perf_counter() - start
        time.sleep(0.002)
    job.result()
    return first_progress, time.perf_counter() - start, job.outputs()


def first_image(updates: list) -> str:
    """The base image file among an event's streamed updates (its first output)."""
    for update in reversed(updates):
        image = update[0].get("value") if isinstance(update[0], dict) else update[0]  # a gr.update or a value
        if isinstance(image, str):
            return image
    raise RuntimeError("the event sent no image")


def page_ready(url: str) -> tuple[float, float]:
    """(seconds until the page shows, seconds until Generate can run: models prepared) in Chromium."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        page.set_default_timeout(600_000)
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#generate-btn")
        shown = time.perf_counter() - start
        page.wait_for_function("() => !document.querySelector('#generate-btn').disabled", polling=50)
        ready = time.perf_counter() - start
        browser.close()
    return shown, ready


def browser_clicks(url: str, clicks: int) -> list[tuple[float, float]]:
    """(click -> first progress text, click -> Generate usable again) for `clicks` Generate clicks."""
    from playwright.sync_api import sync_playwright

    progress_shown = "() => document.querySelector('#status').innerText.includes('round 0 ·')"  # the stage
    button_idle = "() => !document.querySelector('#generate-btn').disabled"
    timings = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        page.set_default_timeout(600_000)
        page.goto(url)
        page.locator("#prompt textarea").fill(PROMPT)
        for _ in range(clicks):
            page.wait_for_function(button_idle)
            start = time.perf_counter()
            page.locator("#generate-btn").click()
            page.wait_for_function(progress_shown, polling=5)
            first_progress = time.perf_counter() - start
            page.wait_for_function(button_idle, polling=5)
            timings.append((first_progress, time.perf_counter() - start))
        browser.close()
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-sdxl")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median shown)")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium click measurement")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from gradio_client import Client, handle_file
    from PIL import Image

    use_browser = not args.no_browser and CHROMIUM.exists()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        process, url, startup = launch_app(args.preset, scratch / "app.log")
        try:
            print(f"== IMG Studio UI benchmark: preset {args.preset}, {os.cpu_count()} CPU cores ==")
            print(f"app.py answering HTTP after {startup:.2f} s (models still preparing)")
            if use_browser:
                shown, ready = page_ready(url)
                print(f"Chromium: page shown after {shown:.2f} s, models ready (Generate usable) after "
                      f"{ready:.2f} s from opening it")  # fmt: skip

            print("\n-- 1. click -> first progress update --")
            if use_browser:
                clicks = browser_clicks(url, 1 + args.repeats)
                (cold_progress, cold_total), warm = clicks[0], clicks[1:]
                print(f"Chromium, first click:                      progress after {cold_progress * 1000:7.1f} ms, "
                      f"done after {cold_total:6.2f} s")  # fmt: skip
                warm_progress, warm_total = median([p for p, _ in warm]), median([t for _, t in warm])
                print(
                    f"Chromium, warm (median of {len(warm)}):            progress after "
                    f"{warm_progress * 1000:7.1f} ms, done after {warm_total:6.2f} s"
                )
            else:
                print("Chromium: skipped (--no-browser or /usr/bin/chromium missing)")
            client = Client(url, verbose=False)
            generate_args = ui_args(client, "/ui_generate", prompt=PROMPT, seed=SEED)
            ui_generate = [timed_job(client, generate_args, "/ui_generate") for _ in range(1 + args.repeats)]
            label = "warm" if use_browser else "first call"
            print(
                f"gradio_client, {label}: progress after {ui_generate[0][0] * 1000:7.1f} ms, "
                f"done after {ui_generate[0][1]:6.2f} s"
            )
            print(
                f"gradio_client, warm (median of {args.repeats}): progress after "
                f"{median([p for p, _, _ in ui_generate[1:]]) * 1000:7.1f} ms"
            )

            refine_args = ui_args(client, "/ui_refine", prompt=PROMPT, seed=SEED, guidance_mode="dialogue",
                                  critique=CRITIQUE)  # fmt: skip
            ui_refine = [timed_job(client, refine_args, "/ui_refine") for _ in range(1 + args.repeats)]
            base_path = first_image(ui_generate[-1][2])  # round 0 image file of the last Generate
            api_refine = []
            for _ in range(1 + args.repeats):
                start = time.perf_counter()
                client.predict(handle_file(base_path), PROMPT, CRITIQUE, SEED, api_name="/refine")
                api_refine.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)

        print("\n-- 2. one round: through the UI vs img_core directly (seconds, median) --")
        from img_core.session import IMGSession, RoundSettings

        session = IMGSession.from_preset(args.preset, show_progress_bars=False)
        start = time.perf_counter()
        session.load()
        direct_load = time.perf_counter() - start
        base = Image.open(base_path).convert("RGB")
        dialogue = RoundSettings(guidance_mode="dialogue")
        direct_generate, direct_refine = [], []
        for _ in range(1 + args.repeats):
            start = time.perf_counter()
            session.generate(PROMPT, SEED, RoundSettings())
            direct_generate.append(time.perf_counter() - start)
            start = time.perf_counter()
            session.refine(base, PROMPT, SEED, critique=CRITIQUE, settings=dialogue)
            direct_refine.append(time.perf_counter() - start)
        rows = [
            ("generate (round 0)", [t for _, t, _ in ui_generate[1:]], direct_generate[1:]),
            ("refine, UI event", [t for _, t, _ in ui_refine[1:]], direct_refine[1:]),
            ("refine, /refine API", api_refine[1:], direct_refine[1:]),
        ]
        print(f"{'':22s} {'through UI':>11s} {'img_core':>9s} {'overhead':>9s}")
        for name, through_ui, direct in rows:
            overhead = median(through_ui) - median(direct)
            print(f"{name:22s} {median(through_ui):11.3f} {median(direct):9.3f} {overhead:+9.3f}")
        print(f"(img_core direct: load {direct_load:.2f} s in this process; warm-up call excluded)")

        print("\n-- 3. second vs first round through the UI (seconds) --")
        first_generate = cold_total if use_browser else ui_generate[0][1]
        second_generate = clicks[1][1] if use_browser else ui_generate[1][1]
        print(
            f"Generate: first {first_generate:.2f}, second {second_generate:.2f} "
            f"(first/second x{first_generate / second_generate:.1f}; the models were prepared at start-up)"
        )
        print(
            f"Refine:   first {ui_refine[0][1]:.2f}, second {ui_refine[1][1]:.2f}, "
            f"later median {median([t for _, t, _ in ui_refine[1:]]):.2f} (no reload after the first Generate)"
        )


if __name__ == "__main__":
    main()
