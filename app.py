"""IMG Studio: interactive multi-round IMG refinement in the browser.

    python app.py --preset tiny-sdxl --host 127.0.0.1 --port 7860 [--share --auth USER:PASS]

Parses flags, builds an IMGSession (nothing loads until the first click needs it) and launches the
Gradio app from `ui`. Everything the app writes lives in one folder (`ui.files`), removed at exit and
on SIGTERM, except the History of sessions (`ui.history`, `--data-dir`), which survives restarts. Switching models changes them for every user, so the server refuses it unless started with
`--allow-model-switch` (never on Hugging Face Spaces). Importing this file loads nothing.
"""

import argparse
import os
import sys

from starlette.middleware import Middleware

import ui
from img_core.cli.parser import OneLineErrorParser
from img_core.errors import IMGError
from img_core.evaluation.scorers import SCORER_NAMES, VQA_SCORER, check_scorer_names
from img_core.presets import default_preset_name
from img_core.session import IMGSession
from img_core.settings import add_model_arguments, model_options_from_args
from ui.api_inputs import MalformedValuesAsNone
from ui.files import open_app_folder
from ui.history import add_history_arguments, history_from_args

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_HINT = " Require a login with --auth USER:PASS."


def exposure_warnings(args: argparse.Namespace) -> list[str]:
    """What to tell the person starting the app when others can reach it."""
    warnings = []
    if args.share:
        warnings.append("warning: --share makes this app public: anyone with the gradio.live link can use it "
                        "and your GPU." + ("" if args.auth else AUTH_HINT))
    if args.host not in LOCAL_HOSTS and not on_spaces():
        warnings.append(f"warning: --host {args.host} serves the app to other machines on the network: anyone who "
                        "can reach this port can use it and your GPU." + ("" if args.auth else AUTH_HINT))
    return warnings


def parse_auth(value: str) -> tuple[str, str]:
    """`USER:PASS` as Gradio's (user, password) pair; both parts must be non-empty."""
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS (a user name and a password separated by ':')")
    return user, password


def on_spaces() -> bool:
    """True on a Hugging Face Space (which sets SPACE_ID), where every visitor shares one app."""
    return bool(os.environ.get("SPACE_ID")) or ui.gpu.on_zero_gpu()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="IMG Studio: Implicit Multimodal Guidance in the browser")
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 serves every interface; "
        "$GRADIO_SERVER_NAME as Hugging Face Spaces set it)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default 7860)"
    )
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", type=parse_auth, default=None, metavar="USER:PASS",
                        help="require this user name and password to open the app (Gradio's login page)")
    parser.add_argument("--allow-model-switch", action="store_true",
                        help="let users switch preset, MLLM and quantization (for everyone using this app); "
                        "always off on Hugging Face Spaces")
    parser.add_argument("--scorer", default=VQA_SCORER, type=scorer_name,
                        help=f"what scores every round in the app: {', '.join(SCORER_NAMES)}, vqascore:<mllm> (a "
                        f"separate judge) or none (default {VQA_SCORER}: the loaded MLLM, no extra memory)")
    add_history_arguments(parser)
    return parser.parse_args(argv)


def scorer_name(value: str) -> str:
    """`--scorer`: a name img_core.evaluation.scorers knows, or none (checked here: a bad name is a usage error)."""
    if value == "none":
        return value
    try:
        return check_scorer_names([value])[0]
    except IMGError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for warning in exposure_warnings(args):
        print(warning, file=sys.stderr)
    options = model_options_from_args(args)
    session = IMGSession.from_preset(options.preset or default_preset_name(), **options.session_kwargs())
    zero_gpu = ui.gpu.on_zero_gpu()
    if zero_gpu:  # ZeroGPU forks a worker per GPU call: models must exist before the first fork
        session.load()
    open_app_folder()  # before the demo is built: Gradio reads its temp dir then
    demo = ui.build_demo(session, allow_model_switch=args.allow_model_switch and not on_spaces(), scorer=args.scorer,
                         history=history_from_args(args))  # fmt: skip
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        app_kwargs={"middleware": [Middleware(MalformedValuesAsNone, blocks=demo)]},
        **ui.launch_kwargs(),
    )


if __name__ == "__main__":
    main()
