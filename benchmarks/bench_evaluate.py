"""`evaluate` benchmark: seconds per image of the win-rate protocol; prints figures, asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_evaluate.py [--preset tiny-sdxl] [--prompts 4] [--steps 2]

1. generation: rounds 0 and 1 of every prompt with one cheap scorer (clipscore), wall seconds per image;
2. scoring alone: the same folder again with hpsv2, imagereward and vqascore added (nothing generated),
   seconds per image per scorer.
On a GPU pass --preset sdxl / flux-dev (and --device cuda) for the figures of a real run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing


def main() -> None:
    from img_core.cli.evaluate import build_parser
    from img_core.evaluation.evaluate import run_evaluation
    from img_core.evaluation.prompt_sets import COMPOSITIONAL_PROMPTS

    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--preset", default="tiny-sdxl")
    options.add_argument("--prompts", type=int, default=4)
    options.add_argument("--steps", type=int, default=2)
    options.add_argument("--device", default=None)
    options.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny presets)")
    args = options.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        common = ["--preset", args.preset, "--prompts", str(COMPOSITIONAL_PROMPTS), "--limit", str(args.prompts),
                  "--rounds", "1", "--steps", str(args.steps), "--out", str(out), "--quiet",
                  *(["--device", args.device] if args.device else [])]
        start = time.perf_counter()
        first = run_evaluation(build_parser().parse_args([*common, "--scorers", "clipscore"]))
        generation = time.perf_counter() - start
        images = first.generated
        start = time.perf_counter()
        second = run_evaluation(build_parser().parse_args([*common, "--scorers", "clipscore,hpsv2,imagereward,vqascore"]))
        scoring = time.perf_counter() - start
    print(f"== evaluate, {args.preset}, {args.prompts} prompts x rounds 0..1, {args.steps} steps, "
          f"{torch.get_num_threads()} CPU thread(s), device {args.device or 'default'} ==")
    print(f"generation + clipscore: {generation:.1f} s for {images} images = {generation / images:.2f} s/image")
    print(f"hpsv2 + imagereward + vqascore added: {scoring:.1f} s for {second.scored} (image, scorer) pairs = "
          f"{scoring / max(second.scored, 1):.2f} s per image per scorer (loading included)")


if __name__ == "__main__":
    main()
