"""IMG Studio: interactive multi-round IMG refinement in the browser.

    python app.py --preset tiny-sdxl --host 127.0.0.1 --port 7860 [--share]

Parses flags, builds an IMGSession (nothing loads until the first click needs it) and launches the
Gradio app from `ui`. Importing this file loads nothing.
"""

import argparse
import os

import ui
from img_core.mllm import QUANTIZATIONS
from img_core.presets import PRESETS, default_preset_name
from img_core.session import IMGSession


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="IMG Studio: Implicit Multimodal Guidance in the browser")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model preset; default: sdxl with a CUDA GPU, else tiny-sdxl (tiny random models, to try it on a CPU)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1, or $GRADIO_SERVER_NAME as Hugging Face Spaces set it)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default 7860)"
    )
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="MLLM quantization (default: bnb-nf4 on CUDA, else none)",
    )
    parser.add_argument("--mllm", default=None, help="MLLM name or folder (default: the preset's)")
    parser.add_argument("--aligner", default=None, help="aligner folder (save_pretrained) or official .pth")
    parser.add_argument(
        "--diffusion-quantization",
        choices=("none", "bnb-nf4", "bnb-8bit"),
        default=None,
        help="quantize the big diffusion components on CUDA (default: bnb-nf4 for flux-dev, else none)",
    )
    parser.add_argument("--offload", action="store_true", default=None,
                        help="CPU-offload the diffusion pipeline (less GPU memory; default: automatic when the GPU "
                        "is smaller than the preset's estimated need)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = args.preset or default_preset_name()
    session = IMGSession.from_preset(
        preset,
        device=args.device,
        quantization=args.quantization,
        mllm=args.mllm,
        aligner=args.aligner,
        offload=args.offload,
        diffusion_quantization=args.diffusion_quantization,
    )
    zero_gpu = ui.gpu.on_zero_gpu()
    if zero_gpu:  # ZeroGPU forks a worker per GPU call: models must exist before the first fork
        session.load()
    demo = ui.build_demo(session, allow_model_switch=not zero_gpu)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs())


if __name__ == "__main__":
    main()
