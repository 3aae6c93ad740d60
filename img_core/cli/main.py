"""Command line: `python -m img_core refine|convert-aligner|convert-llava ...`.

    python -m img_core refine --preset tiny-sdxl --prompt "A green banana and a brown horse." \
        --seed 0 --rounds 2 --out outputs/banana
writes outputs/banana/round_0.png (the initial image), round_1.png, ... and session.json.
Bad input exits non-zero with one line on stderr.
"""

from __future__ import annotations

# The modules that load torch and transformers (the session, the other commands) are imported inside the
# functions that use them, on purpose: `python -m img_core --help` and usage errors answer before they
# load (~3 s). tests/test_architecture.py checks that every such import really defers torch.
import argparse
import logging
import sys
from pathlib import Path

from img_core.cli.outputs import removed_if_left_empty
from img_core.cli.parser import EXIT_BAD_INPUT, EXIT_FAILURE, OneLineErrorParser
from img_core.cli.space_bundle import main as space_bundle_main
from img_core.errors import IMGError
from img_core.images import load_image
from img_core.logs import quiet_library_output
from img_core.settings import (
    LIMITS,
    MLLM_GUIDANCE_MODES,
    add_model_arguments,
    add_round_arguments,
    check_prompt,
    check_rounds,
    check_seed,
    model_options_from_args,
    round_settings_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m img_core", description="IMG: re-generate images that match their prompts")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True)

    refine = commands.add_parser("refine", help="generate (or take) an image and run IMG rounds on it")
    refine.add_argument("--prompt", required=True)
    refine.add_argument("--seed", type=int, default=0)
    refine.add_argument("--rounds", type=int, default=1, help=f"{LIMITS['rounds'].label} (default 1)")
    refine.add_argument("--out", required=True, type=Path, help="output folder (checked before any model loads)")
    refine.add_argument("--image", type=Path, default=None, help="start from this image instead of generating one")
    add_round_arguments(refine)
    add_model_arguments(refine)
    refine.add_argument("--scorer", action="append", default=[], metavar="NAME",
                        help="record each round's alignment score in session.json (vqascore, clipscore, pickscore, "
                        "hpsv2, vqascore:<mllm>; repeat for several)")
    refine.add_argument("--quiet", action="store_true", help="no progress bars")

    convert = commands.add_parser("convert-aligner", help="turn a released aligner .pth into a save_pretrained folder")
    convert.add_argument("--source", required=True, type=Path, help="aligner_sdxl.pth or aligner_flux.pth")
    convert.add_argument("--out", required=True, type=Path)
    convert.add_argument("--mllm", default="img-llava-13b", help="MLLM the aligner was trained with (metadata)")
    convert.add_argument("--chat-template", default="llava-v0", help="chat template of that MLLM (metadata)")
    convert.add_argument("--guidance-mode", default="question", choices=MLLM_GUIDANCE_MODES)

    commands.add_parser("convert-llava", help="convert the released IMG LLaVA folder to transformers format", add_help=False)
    commands.add_parser("prepare", help="fetch and convert what a preset needs, ahead of time", add_help=False)
    commands.add_parser("space-bundle", help="write (and upload) the folder a Hugging Face Space needs", add_help=False)
    commands.add_parser("evaluate", help="generate, refine and score a prompt set (win rates, report)", add_help=False)
    commands.add_parser("evaluate-compare", help="means and win rates of one evaluate run over another", add_help=False)
    commands.add_parser("study", help="serve a blind A/B page over an evaluate folder (human study)", add_help=False)
    commands.add_parser("study-summary", help="the human study's win rates (unanimous and majority rules), CSV",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-llava":
        from img_core.cli.convert_llava import main as convert_llava_main

        return _guarded(lambda: convert_llava_main(argv[1:]), debug="--debug" in argv)
    if argv and argv[0] == "prepare":
        from img_core.cli.prepare import main as prepare_main

        return _guarded(lambda: prepare_main(argv[1:]), debug="--debug" in argv)
    if argv and argv[0] == "space-bundle":
        return _guarded(lambda: space_bundle_main(argv[1:]), debug="--debug" in argv)
    if argv and argv[0] in ("evaluate", "evaluate-compare"):
        from img_core.cli.evaluate import compare_main
        from img_core.cli.evaluate import main as evaluate_main

        _configure_logging("--debug" in argv)
        command = evaluate_main if argv[0] == "evaluate" else compare_main
        return _guarded(lambda: command([a for a in argv[1:] if a != "--debug"]), debug="--debug" in argv)
    if argv and argv[0] in ("study", "study-summary"):
        from img_core.cli.study import main as study_main
        from img_core.cli.study import summary_main

        _configure_logging("--debug" in argv)
        command = study_main if argv[0] == "study" else summary_main
        return _guarded(lambda: command([a for a in argv[1:] if a != "--debug"]), debug="--debug" in argv)
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    if args.command == "refine":
        return _guarded(lambda: refine(args), args.debug)
    return _guarded(lambda: convert_aligner(args), args.debug)


def refine(args: argparse.Namespace) -> int:
    """Generate (or take) an image and refine it; a failure leaves no empty --out folder."""
    with removed_if_left_empty(args.out):
        return _refine(args)


def _refine(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from img_core.record import check_output_folder
    from img_core.session import IMGSession, Stage, StageEvent, check_aligner_source

    # Every argument is checked before any model loads: a bad --out never costs the rounds.
    settings = round_settings_from_args(args)
    check_prompt(args.prompt)
    check_seed(args.seed)
    check_rounds(args.rounds)
    check_output_folder(args.out, "--out")
    if args.scorer:
        from img_core.evaluation.scorers import check_scorer_names

        check_scorer_names(args.scorer)
    if args.aligner is not None:
        check_aligner_source(args.aligner)
    if args.image is not None:
        load_image(args.image)
    session = IMGSession(model_options_from_args(args), show_progress_bars=False)
    bar = tqdm(total=args.rounds + 1, desc="IMG", unit="image", disable=args.quiet, file=sys.stderr)

    def on_stage(event: StageEvent) -> None:
        if event.stage == Stage.DONE:
            bar.update(1)
        elif event.stage == Stage.LOAD:
            bar.set_postfix_str(f"loading {event.step}/{event.total}: {event.message}")
        elif event.step is not None and event.total:
            bar.set_postfix_str(f"round {event.round_index} {event.stage} {event.step}/{event.total}")
        elif event.text is None:
            bar.set_postfix_str(f"round {event.round_index} {event.stage}")

    record = session.run(args.prompt, args.seed, args.rounds, settings, image=args.image, on_stage=on_stage,
                         scorers=args.scorer)
    bar.close()
    path = record.save(args.out)
    if not args.quiet:
        for made in record.rounds:
            if made.scores:
                print(f"round {made.index}: " + ", ".join(f"{name} {value:.4f}" for name, value in made.scores.items()))
        print(f"wrote {len(record.rounds)} images and {path}")
    return 0


def convert_aligner(args: argparse.Namespace) -> int:
    from img_core.aligner import ImplicitAligner

    aligner = ImplicitAligner.from_official_checkpoint(
        args.source, mllm=args.mllm, chat_template=args.chat_template, guidance_mode=args.guidance_mode
    )
    aligner.save_pretrained(args.out)
    print(f"wrote {args.out} ({aligner.config.image_feature_kind}, {sum(p.numel() for p in aligner.parameters()):,} parameters)")
    return 0


def _guarded(command, debug: bool) -> int:
    """Run a command; user errors become one line on stderr and a non-zero exit status."""
    try:
        return int(command() or 0)
    except IMGError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a CLI prints one line; --debug shows the traceback
        if debug:
            raise
        print(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def _configure_logging(debug: bool) -> None:
    # img_core's own warnings (prompt truncated, image resized) reach stderr as "warning: ..." lines.
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    if not debug:
        quiet_library_output()
