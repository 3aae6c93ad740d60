"""Load time, weight memory and guidance time of the tiny MLLMs per quantization (CPU unless --device).

    python benchmarks/bench_mllm.py [--root DIR] [--device cpu|cuda] [--model tiny-llava --model tiny-qwen]

Tiny models are built into --root first if missing. Numbers are for plumbing checks only: tiny models
say nothing about the real models' speed, but they show that every quantization loads and how the weight
bytes shrink (only the language model's linear layers are quantized).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from img_core.mllm import QUANTIZATIONS, resolve_spec
from img_core.mllm.loading import load_mllm
from img_core.tiny.mllm import (
    TINY_LLAVA_NAME,
    TINY_QWEN_NAME,
    build_tiny_llava,
    build_tiny_qwen,
)

BUILDERS = {TINY_LLAVA_NAME: build_tiny_llava, TINY_QWEN_NAME: build_tiny_qwen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="tiny models root (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", action="append", choices=sorted(BUILDERS), help="default: both tiny MLLMs")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="img-bench-"))
    image = Image.new("RGB", (64, 64), (120, 60, 200))
    print(f"{'model':<12} {'quantization':<13} {'load s':>7} {'weights KiB':>12} {'guidance s':>11}  shape")
    for name in args.model or sorted(BUILDERS):
        if not (root / name / "config.json").is_file():
            BUILDERS[name](root / name)
        for quantization in QUANTIZATIONS:
            start = time.perf_counter()
            critic = load_mllm(resolve_spec(name, root), device=args.device, quantization=quantization)
            loaded = time.perf_counter()
            guidance = critic.guidance(image, "a purple square on a white table")
            done = time.perf_counter()
            print(
                f"{name:<12} {quantization:<13} {loaded - start:>7.2f} {critic.memory_bytes() / 1024:>12.1f} "
                f"{done - loaded:>11.2f}  {tuple(guidance.shape)}"
            )


if __name__ == "__main__":
    main()
