"""IMG Studio: interactive multi-round IMG refinement in the browser.

    python app.py --preset tiny-sdxl --host 127.0.0.1 --port 7860 [--share]

Parses flags, builds an IMGSession (nothing loads until the first click needs it) and launches the
Gradio app from `ui`. Importing this file loads nothing.
"""

import argparse
import os

import ui
from img_core.presets import default_preset_name
from img_core.session import IMGSession
from img_core.settings import add_model_arguments, model_options_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="IMG Studio: Implicit Multimodal Guidance in the browser")
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1, or $GRADIO_SERVER_NAME as Hugging Face Spaces set it)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default 7860)"
    )
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = model_options_from_args(args)
    session = IMGSession.from_preset(options.preset or default_preset_name(), **options.session_kwargs())
    zero_gpu = ui.gpu.on_zero_gpu()
    if zero_gpu:  # ZeroGPU forks a worker per GPU call: models must exist before the first fork
        session.load()
    demo = ui.build_demo(session, allow_model_switch=not zero_gpu)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs())


if __name__ == "__main__":
    main()
