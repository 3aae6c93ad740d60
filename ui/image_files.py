"""PNG files for the images the page shows, written once per image.

Gradio re-encodes every PIL image of every update (about 0.35 s per 1024x1024 PNG), and each round's
update shows all rounds again; giving it a file path instead costs a copy. A file lives as long as its
PIL image: it is removed when the image is garbage-collected (its session's state is gone) or at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path

from PIL import Image

_files: dict[int, str] = {}  # id(image) -> its PNG; entries leave with their image (weakref.finalize)
_lock = threading.Lock()
_folder: Path | None = None


def png_file(image: Image.Image) -> str:
    """The path of `image` saved as PNG (saved on the first call for this image object)."""
    key = id(image)
    with _lock:
        path = _files.get(key)
        if path is not None and os.path.exists(path):
            return path
        path = str(_images_folder() / f"{uuid.uuid4().hex}.png")
        image.save(path, format="PNG")
        _files[key] = path
        weakref.finalize(image, _forget, key, path)
        return path


def _forget(key: int, path: str) -> None:
    with _lock:
        if _files.get(key) == path:
            del _files[key]
    Path(path).unlink(missing_ok=True)


def _images_folder() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="img-studio-images-"))
        atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    return _folder
