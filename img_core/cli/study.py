"""`python -m img_core study` and `study-summary`: flags in, img_core.evaluation.study out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from img_core.cli.parser import OneLineErrorParser
from img_core.evaluation.evaluate import format_interval, format_percent
from img_core.evaluation.study import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    make_server,
    write_study_summary,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m img_core study",
                                description="serve a blind A/B page (round 0 vs round K) over an evaluate folder; "
                                "votes go to EVAL_DIR/study.sqlite3")
    parser.add_argument("eval_dir", type=Path, help="a folder written by `python -m img_core evaluate`")
    parser.add_argument("--round", type=int, default=None, help="the IMG round compared with round 0 (default: the last)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine "
                        "only; 0.0.0.0 lets other machines in)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    server = make_server(args.eval_dir, args.host, args.port, args.round)
    host, port = server.server_address[:2]
    print(f"study of {len(server.RequestHandlerClass.study_pairs)} pairs: http://{host}:{port}/ "
          "(each rater's id comes from ?rater=NAME or is made up by the browser)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_summary_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m img_core study-summary",
                                description="the paper's rule (3 raters, unanimous pairs only) and the majority "
                                "rule over a study's votes, with 95 % Wilson intervals; a CSV per pair")
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--round", type=int, default=None, help="the round the study compared (default: the last)")
    parser.add_argument("--csv", type=Path, default=None, help="where the per-pair CSV goes (default EVAL_DIR/study_pairs.csv)")
    return parser


def summary_main(argv: list[str] | None = None) -> int:
    args = build_summary_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    summary = write_study_summary(args.eval_dir, args.csv, args.round)
    print(f"{summary['votes']} votes by {summary['raters']} raters; {summary['pairs_judged']} of {summary['pairs']} "
          f"pairs judged by >= {summary['raters_per_pair']} raters")
    for rule, label in (("unanimous", "unanimous pairs only (the paper's rule)"), ("majority", "majority of 3")):
        numbers = summary[rule]
        print(f"{label}: refined preferred in {format_percent(numbers['refined_win_rate'])} of {numbers['pairs']} pairs "
              f"{format_interval(numbers['ci95'], format_percent)}")
    return 0
