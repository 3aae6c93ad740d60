"""`python -m img_core prepare`: fetch and convert what a preset needs, ahead of time."""

from __future__ import annotations

import argparse
import sys

from img_core.cli.parser import OneLineErrorParser
from img_core.errors import IMGError
from img_core.paths import CACHE_ENV, DEFAULT_CACHE_DIR
from img_core.presets import PRESETS
from img_core.weights.prepare import prepare


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m img_core prepare",
        description="Fetch and convert what a preset needs, ahead of time (Docker image, Space build step).",
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--mllm", default=None, help="MLLM name, converted folder, or hub id of a converted copy "
                        "(made with `convert-llava --push-to-hub`; then only downloaded)")
    parser.add_argument("--keep-original", action="store_true", help="keep the downloaded original LLaVA layout")
    parser.add_argument("--cache-dir", default=None, help=f"converted models go here (default ${CACHE_ENV} or "
                        f"{DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-aligner", action="store_true", help="do not fetch the aligner file")
    parser.add_argument("--all", action="store_true", dest="everything",
                        help="also fetch the diffusion model (or UNet), the IP-Adapter and the encoders: every hub "
                        "file the preset loads, so the machine can then run it offline (HF_HUB_OFFLINE=1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m img_core prepare --preset NAME [--all] [--mllm HUB_ID_OR_DIR] [--keep-original]`."""
    args = build_parser().parse_args(argv)
    try:
        report = prepare(
            args.preset,
            mllm=args.mllm,
            cache_dir=args.cache_dir,
            keep_original=args.keep_original,
            with_aligner=not args.no_aligner,
            show_progress_bars=not args.quiet,
            everything=args.everything,
        )
    except IMGError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0
