"""`python -m img_core space-bundle --out DIR [--push USER/SPACE]`: the folder a Hugging Face Space needs
(img_core/space_bundle.py), optionally uploaded to a Space."""

from __future__ import annotations

import sys

from img_core.cli.parser import OneLineErrorParser
from img_core.errors import IMGError, InvalidInputError
from img_core.space_bundle import check_space_id, push_bundle, write_bundle


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="python -m img_core space-bundle",
        description="Write exactly the files a Hugging Face Space needs (app, packages, assets, README with Spaces "
        "front matter, Spaces requirements) into a new folder, and optionally upload it.",
    )
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--push", metavar="USER/SPACE", help="then upload the folder to this Space (created if "
                        "needed, Gradio SDK; needs `hf auth login` with a write token)")
    parser.add_argument("--private", action="store_true", help="with --push: create the Space private")
    parser.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, send nothing")
    args = parser.parse_args(argv)
    try:
        if args.push:
            check_space_id(args.push)  # a bad id is refused before anything is written
        elif args.dry_run or args.private:
            raise InvalidInputError("--dry-run and --private go with --push USER/SPACE")
        bundle = write_bundle(args.out)
        print(f"wrote {len(bundle.files)} files to {bundle.folder}")
        if args.push and args.dry_run:
            print(f"would upload to https://huggingface.co/spaces/{args.push} (upload_folder, one commit):")
            for name in bundle.files:
                print(f"  {name}")
        elif args.push:
            print(f"uploaded -> {push_bundle(bundle, args.push, private=args.private)}")
    except IMGError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
