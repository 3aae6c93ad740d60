"""What the session zip costs, before and after it moved off the round's update path: prints figures,
asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_export.py [--rounds 10] [--size 1024] [--repeats 3]

A session of `--rounds` rounds of `--size`x`--size` images (smooth colour fields with noise, which
compress like photographs), then:
- before: every page update of a job re-encoded every round into a deflated zip
  (`SessionRecord.write_zip`, what the page did after each round until this change);
- after, update path: what the page does per round update now (`StudioUI._state_views`: the base image,
  the critique box, the next-round note; no zip);
- after, Download click: `Studio.export`, the zip built from the PNGs the page already wrote, stored.
No model runs: the page is built for the tiny preset without loading it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from img_core.record import Round, SessionRecord  # noqa: E402
from img_core.session import IMGSession  # noqa: E402
from ui import build_demo  # noqa: E402
from ui.image_files import png_file  # noqa: E402
from ui.state import StudioState  # noqa: E402

PROMPT = "A green banana and a brown horse."


def photo_like(size: int, seed: int) -> Image.Image:
    """A smooth colour field with a little noise: compresses about as well as a generated photograph."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-6, 7, smooth.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def session_of(rounds: int, size: int) -> StudioState:
    state = StudioState().started(Round(0, photo_like(size, 0), PROMPT, 0, "generated"))
    for index in range(1, rounds):
        state = state.extended(Round(index, photo_like(size, index), PROMPT, 0, "refined", critique="more horse"))
    for made in state.rounds:
        png_file(made.image)  # the page wrote every card's PNG when it showed the round
    return state


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    state = session_of(args.rounds, args.size)
    page = build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu"), prepare_models=False).studio_ui
    record = SessionRecord(PROMPT, 0, "tiny-sdxl", rounds=state.rounds)
    with tempfile.TemporaryDirectory() as scratch:
        before = timed(lambda: record.write_zip(Path(scratch) / "session.zip"), args.repeats)
    after_update = timed(lambda: page._state_views(state), args.repeats)
    click = timed(lambda: page.studio.export(state, "bench"), args.repeats)
    size_mb = page.studio.export(state, "bench").stat().st_size / 1e6
    page.studio.end_session("bench")

    print(f"session: {args.rounds} rounds of {args.size}x{args.size}; median of {args.repeats}")
    print(f"round update path, before (zip re-encoded on every update): {before * 1000:8.1f} ms")
    print(f"round update path, after  (no zip; base image, note):       {after_update * 1000:8.1f} ms")
    print(f"Download click, after (zip of the written PNGs, stored):    {click * 1000:8.1f} ms  ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
