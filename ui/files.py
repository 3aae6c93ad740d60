"""The one folder for everything the app writes: page images, session zips, Gradio's uploads and cache.

`open_app_folder()` (app.py calls it at start, before building the demo) creates
`<temp dir>/img-studio-app/<pid>-<random token>/`, owned by a lock: the process holds an exclusive
`flock` on the folder's `.lock` file for its whole life (the kernel releases it when the process ends,
even with kill -9). Start-up removes the folders that earlier runs left behind: exactly those whose lock
nobody holds. A process id says nothing here: apps in other containers (other PID namespaces) that
share the temp folder have ids that may not exist, or belong to someone else, in this one. A new
folder is created under a dot-name and renamed once locked, so no app ever sees it unlocked.

It points Gradio's temp dir (`GRADIO_TEMP_DIR`) and Python's `tempfile` into the folder, and removes it
at exit (a normal exit, Ctrl-C, or SIGTERM: `ui.shutdown`).

`app_subfolder(name)` is a folder inside it. Code that builds the demo without `open_app_folder` (tests,
benchmarks) gets the same layout, created on first use and removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

PARENT_NAME = "img-studio-app"  # <temp dir>/img-studio-app/<pid>-<token>: one folder per running app
LOCK_NAME = ".lock"  # held (flock) by the folder's app while it runs
GRADIO_SUBFOLDER = "gradio"  # Gradio's uploads and the files it serves
# Uploads and served result files older than this are removed (Gradio's `delete_cache`; app.py
# --served-files-minutes): a client fetches a result at once, and the page shows its images from
# `ui.image_files`, written again on need.
SERVED_FILES_MINUTES = 15.0

SYSTEM_TEMP = Path(tempfile.gettempdir())  # before open_app_folder points `tempfile` into the app's folder
_folder: Path | None = None
_owner_pid: int | None = None  # the process that created `_folder`
_lock_fd: int | None = None  # the open, flock-ed `.lock` of `_folder`: kept open for the process's life
_lock = threading.Lock()


def open_app_folder(parent: Path | None = None) -> Path:
    """Create this process's folder, locked (removing stale ones), send Gradio's and Python's temporary
    files into it and remove it at exit. Returns the folder."""
    global _lock_fd
    with _lock:
        parent = Path(parent) if parent is not None else SYSTEM_TEMP / PARENT_NAME
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_folders(parent)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        creating = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))  # dot-names are never removed
        _lock_fd = lock_folder(creating)
        if _lock_fd is None:
            raise RuntimeError(f"could not lock the new app folder {creating}")
        folder = creating.rename(parent / name)
        _set_folder(folder)
    gradio_folder = app_subfolder(GRADIO_SUBFOLDER)
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_folder)  # read when the Blocks are built
    # Third-party temporary files too; Gradio serves files from under the temp dir, so it is the folder itself.
    tempfile.tempdir = str(folder)
    return folder


def lock_folder(folder: Path) -> int | None:
    """An open descriptor of `folder`'s lock file, exclusively locked; None when another process holds
    it (or it cannot be opened: someone else's folder)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


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
    """Remove the folders under `parent` whose lock no running process holds; returns them. Dot-names
    (a folder being created) are left alone."""
    removed = []
    for child in sorted(parent.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        fd = lock_folder(child)
        if fd is None:  # an app is running in it (here or in another container)
            continue
        try:
            shutil.rmtree(child, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(child)
    return removed


def _set_folder(folder: Path) -> None:
    global _folder, _owner_pid
    first = _folder is None
    _folder, _owner_pid = folder, os.getpid()
    if first:
        atexit.register(remove_app_folder)


def served_files_delete_cache(minutes: float = SERVED_FILES_MINUTES) -> tuple[int, int]:
    """Gradio's `delete_cache` for files kept `minutes`: (how often to look, how old a file may be), in
    whole seconds; it looks three times per lifetime, at most every 5 minutes."""
    if not minutes > 0:
        raise ValueError(f"served files must be kept a positive number of minutes, got {minutes}")
    how_old = max(1, round(minutes * 60))
    return max(1, min(300, how_old // 3)), how_old
