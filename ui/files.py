"""The one folder for everything the app writes: page images, session zips, Gradio's uploads and cache.

`open_app_folder()` (app.py calls it at start, before building the demo) creates
`<temp dir>/img-studio-app/<pid>/`, removes the folders that earlier runs left behind (a process killed
with -9 cannot clean up; only folders of processes that are gone are removed), points Gradio's temp dir
(`GRADIO_TEMP_DIR`) and Python's `tempfile` into it, and removes it at exit: a normal exit, Ctrl-C, or
SIGTERM (turned into a clean exit so that the exit handlers run).

`app_subfolder(name)` is a folder inside it. Code that builds the demo without `open_app_folder` (tests,
benchmarks) gets the same layout, created on first use and removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

PARENT_NAME = "img-studio-app"  # <temp dir>/img-studio-app/<pid>: one folder per running app
GRADIO_SUBFOLDER = "gradio"  # Gradio's uploads and the files it serves

SYSTEM_TEMP = Path(tempfile.gettempdir())  # before open_app_folder points `tempfile` into the app's folder
_folder: Path | None = None
_owner_pid: int | None = None  # the process that created `_folder`
_lock = threading.Lock()


def open_app_folder(parent: Path | None = None) -> Path:
    """Create this process's folder (removing stale ones), send Gradio's and Python's temporary files
    into it and remove it at exit, SIGTERM included. Returns the folder. Call from the main thread."""
    with _lock:
        parent = Path(parent) if parent is not None else SYSTEM_TEMP / PARENT_NAME
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_folders(parent)
        folder = parent / str(os.getpid())
        shutil.rmtree(folder, ignore_errors=True)  # a previous run with our pid (containers reuse pids)
        folder.mkdir()
        _set_folder(folder)
    gradio_folder = app_subfolder(GRADIO_SUBFOLDER)
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_folder)  # read when the Blocks are built
    # Third-party temporary files too; Gradio serves files from under the temp dir, so it is the folder itself.
    tempfile.tempdir = str(folder)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return folder


def app_folder() -> Path:
    """This process's folder (created on first use when `open_app_folder` was not called)."""
    with _lock:
        if _folder is None:
            _set_folder(Path(tempfile.mkdtemp(prefix=f"{PARENT_NAME}-")))
        return _folder


def app_subfolder(name: str) -> Path:
    """`name` inside the app's folder, created if missing."""
    path = app_folder() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_app_folder() -> None:
    """Remove everything the app wrote (registered to run at exit), and the parent folder once empty.
    Only the process that created the folder removes it: a forked worker (ZeroGPU forks one per GPU call)
    inherits the exit handlers but must leave the folder to its parent."""
    if _folder is not None and _owner_pid == os.getpid():
        shutil.rmtree(_folder, ignore_errors=True)
        if _folder.parent.name == PARENT_NAME:
            with contextlib.suppress(OSError):  # other apps still running
                _folder.parent.rmdir()


def remove_stale_folders(parent: Path) -> list[Path]:
    """Remove the folders under `parent` whose process no longer runs; returns them."""
    removed = []
    for child in parent.iterdir():
        if child.is_dir() and child.name.isdigit() and not _process_exists(int(child.name)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _set_folder(folder: Path) -> None:
    global _folder, _owner_pid
    first = _folder is None
    _folder, _owner_pid = folder, os.getpid()
    if first:
        atexit.register(remove_app_folder)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (docker stop, systemd, Spaces restarts) exits like Ctrl-C: exit handlers run."""
    print("IMG Studio: SIGTERM received, removing the app's files and exiting", file=sys.stderr)
    sys.exit(0)
