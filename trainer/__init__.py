"""Training for IMG: feature extraction, the Implicit Aligner trainer and MLLM fine-tuning.

Entry points (each a module with its own `--help`):
    python -m trainer.extract        Pick-a-Pic-style pairs -> feature store (img-features/1)
    python -m trainer.train          feature store (or --online) -> trained aligner in RUN/final/
    python -m trainer.finetune_mllm  InstructPix2Pix-style triplets -> merged MLLM folder

`trainer.loop` holds what the two training loops share (checkpoints, resume, the skip-safe step).
Importing this package loads nothing.
"""

from __future__ import annotations

import dataclasses

from img_core.cli.parser import OneLineErrorParser


def option(default, help: str, **metadata):
    """A config dataclass field with its command-line help (and optional "choices"; "const" makes the
    value optional: `--resume` alone means the const)."""
    if "const" in metadata:
        metadata = {"nargs": "?", **metadata}
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_config(config_class: type, argv: list[str] | None = None, description: str | None = None,
                 prog: str | None = None):
    """Build a config dataclass from command-line flags with transformers' `HfArgumentParser`: one
    `--flag-name` per field, the field's metadata as add_argument keywords, bools as `--flag [true|false]`
    (plus `--no-flag` for those that default to True). Usage errors are one line (OneLineErrorParser)."""
    # transformers is imported here, not at module level: importing `trainer` must stay cheap (it pulls torch).
    from transformers import HfArgumentParser

    class ConfigParser(HfArgumentParser, OneLineErrorParser):
        """HfArgumentParser's dataclass fields with OneLineErrorParser's one-line usage errors."""

    parser = ConfigParser(config_class, prog=prog, description=description)
    return config_class(**vars(parser.parse_args(argv)))
