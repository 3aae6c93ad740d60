"""`python -m img_core evaluate` and `evaluate-compare`: flags in, the library's evaluation out."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from img_core.cli.outputs import removed_if_left_empty
from img_core.cli.parser import OneLineErrorParser
from img_core.evaluation.evaluate import (
    DEFAULT_SCORE_BATCH,
    DEFAULT_SCORERS,
    IMAGES_DIR,
    REPORT_FILE,
    SEED_STRIDE,
    SUMMARY_FILE,
    compare_runs,
    format_interval,
    format_percent,
    format_summary,
    run_evaluation,
)
from img_core.evaluation.scorers import SCORER_NAMES
from img_core.evaluation.statistics import DEFAULT_INTERVAL_METHOD, INTERVAL_METHODS
from img_core.settings import LIMITS, add_model_arguments, add_round_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m img_core evaluate",
                                     description="generate round 0 and N IMG rounds per prompt, score them, summarise")
    parser.add_argument("--prompts", required=True,
                        help=".txt (one per line), .json list, .csv/.tsv/.parquet with a prompt column, or a hub dataset id")
    parser.add_argument("--prompt-column", default=None, help="column of a .csv/.tsv/.parquet/.json/dataset (default: prompt)")
    parser.add_argument("--prompt-split", default=None, help="split of a hub dataset (default: test)")
    parser.add_argument("--rounds", type=int, default=1, help=f"{LIMITS['rounds'].label} (default 1)")
    parser.add_argument("--scorers", default=DEFAULT_SCORERS,
                        help=f"comma-separated: {', '.join(SCORER_NAMES)}, vqascore:<mllm> (a named judge), vqascore:self (the "
                        f"guidance MLLM judges itself) (default {DEFAULT_SCORERS})")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt 0; prompt i uses seed + i")
    parser.add_argument("--seeds", type=int, default=1,
                        help=f"seeds per prompt (default 1); seed index j uses seed + i + j * {SEED_STRIDE}; the "
                        "prompt stays the unit of every interval")
    parser.add_argument("--interval", choices=INTERVAL_METHODS, default=DEFAULT_INTERVAL_METHOD,
                        help=f"win-rate interval (default {DEFAULT_INTERVAL_METHOD}; clopper-pearson is exact and wider)")
    parser.add_argument("--limit", type=int, default=None, help="only the first K prompts")
    add_round_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--score-batch", type=int, default=DEFAULT_SCORE_BATCH, help="images per scorer call")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    new_folder = not Path(args.out).exists()
    with removed_if_left_empty(args.out):  # then the empty folders on the way to --out go too
        try:
            result = run_evaluation(args)
        except BaseException:
            if new_folder and not any(Path(args.out).glob(f"**/{IMAGES_DIR}/*.png")):
                shutil.rmtree(args.out, ignore_errors=True)  # only run.json and empty folders: nothing to resume
            raise
    if not args.quiet and result.summary is not None:  # under accelerate, the main process prints
        print(format_summary(result.summary))
        print(f"generated {result.generated} images, scored {result.scored}; wrote {result.out_dir / SUMMARY_FILE} "
              f"and {result.out_dir / REPORT_FILE}")
    return 0


def build_compare_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m img_core evaluate-compare",
                                description="per-scorer means, win rates and differences of run A over run B "
                                "on the (prompt, seed) samples both hold, with 95 % intervals")
    parser.add_argument("dir_a", type=Path)
    parser.add_argument("dir_b", type=Path)
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs made with other --seed/--seeds or VQAScore judges (warns instead of refusing)")
    parser.add_argument("--interval", choices=INTERVAL_METHODS, default=DEFAULT_INTERVAL_METHOD,
                        help=f"win-rate interval (default {DEFAULT_INTERVAL_METHOD})")
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    args = build_compare_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    comparison = compare_runs(args.dir_a, args.dir_b, allow_mismatch=args.allow_mismatch, interval=args.interval)
    print(f"A: {args.dir_a}\nB: {args.dir_b}")
    for line in comparison.differing_settings:
        print(f"differs: {line}")
    for warning in comparison.warnings:
        print(f"warning: {warning}")
    print(f"{'scorer':<16}{'round':>6}{'n':>6}{'mean A':>11}{'mean B':>11}{'A wins':>9}  {'ci95':<17}{'A - B':>10}  ci95")
    for row in comparison.rows:
        print(f"{row['scorer']:<16}{row['round']:>6}{row['n']:>6}{row['mean_a']:>11.4f}{row['mean_b']:>11.4f}"
              f"{format_percent(row['win_rate_a']):>9}  {format_interval(row['win_rate_ci95'], format_percent):<17}"
              f"{row['mean_difference']:>10.4f}  {format_interval(row['mean_difference_ci95'], lambda v: f'{v:.4f}')}")
    return 0
