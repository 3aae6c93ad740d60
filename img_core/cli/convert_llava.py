"""`python -m img_core convert-llava`: an original-layout LLaVA folder to transformers, optionally pushed."""

from __future__ import annotations

import sys
from pathlib import Path

from img_core.cli.parser import OneLineErrorParser
from img_core.errors import IMGError, InvalidInputError
from img_core.weights.convert_llava import (
    CHAT_TEMPLATES,
    DEFAULT_VISION_TOWER,
    DTYPES,
    check_push_target,
    conversion_lock_path,
    convert_llava_checkpoint,
    exclusive_lock,
    push_to_hub,
)


def main(argv: list[str] | None = None) -> int:
    """`python -m img_core convert-llava --source DIR --out DIR [--vision-tower ID] [--chat-template T]
    [--push-to-hub ID]`."""
    parser = OneLineErrorParser(
        prog="python -m img_core convert-llava",
        description="Convert an original-layout LLaVA checkpoint (e.g. shi-labs/IMG llava/) to transformers.",
    )
    parser.add_argument("--source", help="folder in the original LLaVA code-base layout (optional with "
                        "--push-to-hub when --out is already a converted folder)")
    parser.add_argument("--out", required=True, help="output folder (transformers LlavaForConditionalGeneration)")
    parser.add_argument("--vision-tower", default=DEFAULT_VISION_TOWER, help="CLIP vision tower hub id or folder")
    parser.add_argument(
        "--chat-template", default="llava-v0", choices=CHAT_TEMPLATES,
        help="template the checkpoint was fine-tuned with (IMG's `llava` folder: llava-v0)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's torch_dtype")
    parser.add_argument("--push-to-hub", metavar="ID", help="then upload the converted folder to this hub repo "
                        "(owner/name; needs `hf auth login`), so a Space can load it with --mllm ID")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    try:
        if args.push_to_hub:
            check_push_target(args.push_to_hub)  # refuse a bad id or offline mode before converting
        if args.source:
            with exclusive_lock(conversion_lock_path(Path(args.out))):  # the same lock as `prepare`
                out = convert_llava_checkpoint(
                    args.source,
                    Path(args.out),
                    vision_tower=args.vision_tower,
                    chat_template=args.chat_template,
                    dtype=DTYPES[args.dtype] if args.dtype else None,
                )
            print(f"converted {args.source} -> {out}")
        elif not args.push_to_hub:
            raise InvalidInputError("--source is required (unless --push-to-hub uploads an existing --out folder)")
        if args.push_to_hub:
            url = push_to_hub(Path(args.out), args.push_to_hub, private=args.private)
            print(f"uploaded {args.out} -> {url}")
    except IMGError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
