"""IMG Studio: interactive multi-round IMG refinement in the browser.

    python app.py --preset tiny-sdxl --host 127.0.0.1 --port 7860 [--share --auth-file FILE]

Parses flags, builds an IMGSession (nothing loads until the first click needs it) and launches the
Gradio app from `ui`. Everything the app writes lives in one folder (`ui.files`), removed at exit.
The History of sessions (`ui.history`, `--data-dir`) survives restarts.
SIGTERM stops gracefully (`ui.shutdown`): new calls are refused with a message, the running job ends at
its next step, then the app exits with status 0. Switching models changes them for every user, so the server refuses it unless started with
`--allow-model-switch` (never on Hugging Face Spaces). A login (Gradio's page) takes its credentials
from `--auth-file`, `$IMG_STUDIO_AUTH` or `--auth` (visible to every user of the machine in `ps`: a
warning says so); wrong logins are throttled (`ui.api_inputs.LoginThrottle`). Importing this file loads
nothing.
"""

import argparse
import dataclasses
import gc
import os
import sys
from pathlib import Path

from starlette.middleware import Middleware

import ui
from img_core.cli.parser import OneLineErrorParser
from img_core.errors import IMGError
from img_core.evaluation.scorers import SCORER_NAMES, VQA_SCORER, check_scorer_names
from img_core.presets import default_preset_name, get_preset
from img_core.session import IMGSession
from img_core.settings import (
    DEFAULT_GUIDANCE_MODE,
    GUIDANCE_MODES,
    add_model_arguments,
    model_options_from_args,
)
from ui import shutdown
from ui.api_inputs import ApiInputGuard, LoginThrottle
from ui.files import (
    SERVED_FILES_MINUTES,
    open_app_folder,
    remove_app_folder,
    served_files_delete_cache,
)
from ui.history import add_history_arguments, history_from_args
from ui.sessions import IDLE_SECONDS, SESSION_CAPACITY, SessionSweeper

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_HINT = " Require a login with --auth-file FILE (a line USER:PASS) or $IMG_STUDIO_AUTH=USER:PASS."
AUTH_VARIABLE = "IMG_STUDIO_AUTH"  # USER:PASS, read when neither --auth-file nor --auth is given
ARGV_AUTH_WARNING = ("warning: --auth puts the password on the command line, where every user of this machine "
                     f"can read it (ps, /proc); use --auth-file FILE or ${AUTH_VARIABLE} instead")


def exposure_warnings(args: argparse.Namespace) -> list[str]:
    """What to tell the person starting the app when others can reach it."""
    warnings = []
    if args.auth_source == "--auth":
        warnings.append(ARGV_AUTH_WARNING)
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


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """The USER:PASS lines of `path` (blank lines and # comments skipped), at least one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                pairs.append(parse_auth(line.strip()))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{path} line {number}: expected USER:PASS") from None
    if not pairs:
        raise argparse.ArgumentTypeError(f"{path} holds no USER:PASS line")
    return pairs


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
    parser.add_argument("--auth-file", type=Path, default=None, metavar="FILE",
                        help="require a login to open the app: one USER:PASS per line (Gradio's login page); "
                        f"or set ${AUTH_VARIABLE}=USER:PASS")
    parser.add_argument("--auth", type=parse_auth, default=None, metavar="USER:PASS",
                        help="like --auth-file, but the password is visible to every user of the machine (ps)")
    parser.add_argument("--allow-model-switch", action="store_true",
                        help="let users switch preset, MLLM and quantization (for everyone using this app); "
                        "always off on Hugging Face Spaces")
    parser.add_argument("--scorer", default=VQA_SCORER, type=scorer_name,
                        help=f"what scores every round in the app: {', '.join(SCORER_NAMES)}, vqascore:<mllm> (a "
                        f"separate judge) or none (default {VQA_SCORER}: the loaded MLLM, no extra memory)")
    parser.add_argument("--session-idle-seconds", type=float, default=IDLE_SECONDS, metavar="S",
                        help=f"free the memory of an API session (one without rounds) idle this long (default "
                        f"{IDLE_SECONDS:g})")
    parser.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default=DEFAULT_GUIDANCE_MODE,
                        help="the page's default Guidance mode: auto (an edited critique steers, an untouched one "
                        "keeps the paper's question-mode guidance), question or dialogue (for an aligner trained "
                        f"on dialogue guidance; README) (default {DEFAULT_GUIDANCE_MODE})")
    parser.add_argument("--served-files-minutes", type=positive_minutes, default=SERVED_FILES_MINUTES, metavar="M",
                        help="remove uploads and served result files (API outputs) after this many minutes "
                        f"(default {SERVED_FILES_MINUTES:g})")
    add_history_arguments(parser)
    args = parser.parse_args(argv)
    args.auth, args.auth_source = credentials(args, parser)
    return args


def credentials(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list | None, str | None]:
    """The login's (user, password) pairs and where they came from: --auth-file, --auth or the variable."""
    if args.auth_file is not None and args.auth is not None:
        parser.error("give --auth-file or --auth, not both")
    try:
        if args.auth_file is not None:
            return read_auth_file(args.auth_file), "--auth-file"
        if args.auth is not None:
            return [args.auth], "--auth"
        if os.environ.get(AUTH_VARIABLE):
            return [parse_auth(os.environ[AUTH_VARIABLE])], AUTH_VARIABLE
    except argparse.ArgumentTypeError as error:
        parser.error(f"{AUTH_VARIABLE if args.auth_file is None else '--auth-file'}: {error}")
    return None, None


def positive_minutes(value: str) -> float:
    """`--served-files-minutes`: a positive number (checked here: a bad one is a usage error)."""
    try:
        minutes = float(value)
        served_files_delete_cache(minutes)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {value!r}") from None
    return minutes


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
    zero_gpu = ui.gpu.on_zero_gpu()
    if zero_gpu and not options.quantization:  # no GPU to measure at start-up: the slice's memory counts
        preset = get_preset(options.preset or default_preset_name())
        options = dataclasses.replace(options, quantization=ui.gpu.zero_gpu_precision(preset).quantization)
    session = IMGSession(options)
    if zero_gpu:  # ZeroGPU forks a worker per GPU call: models must exist before the first fork
        session.load()
    open_app_folder()  # before the demo is built: Gradio reads its temp dir then
    demo = ui.build_demo(session, allow_model_switch=args.allow_model_switch and not on_spaces(), scorer=args.scorer,
                         history=history_from_args(args), guidance_mode=args.guidance_mode,
                         served_files_minutes=args.served_files_minutes)  # fmt: skip
    shutdown.install(demo, on_forced_exit=remove_app_folder)
    SessionSweeper(demo, idle_seconds=args.session_idle_seconds).start()
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        app_kwargs={"middleware": [Middleware(ApiInputGuard, blocks=demo), Middleware(LoginThrottle)]},
        state_session_capacity=SESSION_CAPACITY,
        **ui.launch_kwargs(),
    )
    # Closed (SIGTERM, Ctrl-C): the exit handlers remove the app's folder. Freezing the heap first spares
    # the interpreter's final garbage collection over every object of torch and Gradio (~10 s of a stop).
    gc.freeze()


if __name__ == "__main__":
    main()
