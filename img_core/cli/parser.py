"""The argument parser every `python -m img_core` command uses, and the shared exit codes."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line with a pointer to --help (argparse prints the
    whole usage, 14 lines for `refine`); its sub-command parsers are of the same class."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")
