"""Training for IMG: feature extraction, the Implicit Aligner trainer and MLLM fine-tuning.

Entry points (each a module with its own `--help`):
    python -m trainer.extract        Pick-a-Pic-style pairs -> feature store (img-features/1)
    python -m trainer.train          feature store (or --online) -> trained aligner in RUN/final/
    python -m trainer.finetune_mllm  InstructPix2Pix-style triplets -> merged MLLM folder

Importing this package loads nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default, help: str, **metadata):
    """A config dataclass field with its command-line help (and optional "choices" / "const")."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_config(
    config_class: type, argv: list[str] | None = None, description: str | None = None, prog: str | None = None
):
    """Build a config dataclass from command-line flags: one `--flag-name` per field, the field's
    `metadata["help"]` as help text, bools as `--flag/--no-flag`. Fields whose metadata has "const"
    take an optional value (`--resume` alone means the const)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        if optional:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        kwargs = {"default": field.default, "help": field.metadata.get("help", "")}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "const" in field.metadata:
            parser.add_argument(flag, type=kind, nargs="?", const=field.metadata["const"], **kwargs)
        else:
            parser.add_argument(flag, type=kind, **kwargs)
    return config_class(**vars(parser.parse_args(argv)))
