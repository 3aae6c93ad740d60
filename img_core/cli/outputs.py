"""Output folders of CLI commands: a command that fails leaves no empty folder behind.

    with removed_if_left_empty(args.out):
        check_output_folder(args.out, "--out")   # creates it, before any model loads
        ...                                       # may fail: the folders it created go again if empty

Folders that existed before the command are never touched, nor is any folder holding a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def removed_if_left_empty(folder: str | Path) -> Iterator[None]:
    """Run the block; if it raises (a user error, a failure, Ctrl-C), remove the folders on the way to
    `folder` that did not exist before and are empty, deepest first, then re-raise."""
    folder = Path(folder).expanduser().absolute()
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):  # not empty (or already gone): kept
                os.rmdir(path)
        raise
