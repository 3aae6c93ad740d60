"""PNG files for the images the page shows, written once per image content.

Gradio re-encodes every PIL image of every update (about 0.35 s per 1024x1024 PNG), and each round's
update shows all rounds again; giving it a file path instead costs a copy. Files are keyed by a hash of
the pixels, not by the PIL object: where state is unpickled per call (ZeroGPU) the same round arrives as a
new object and must not be written again. At most `MAX_FILES` are kept (Gradio serves its own copies),
in the app's folder (`ui.files`), which is removed at exit.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from ui.files import app_subfolder

MAX_FILES = 512
_files: OrderedDict[str, str] = OrderedDict()  # pixel hash -> its PNG, least recently used first
_lock = threading.Lock()


def image_key(image: Image.Image) -> str:
    """A hash of the image's mode, size and pixels."""
    digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def png_file(image: Image.Image) -> str:
    """The path of `image` saved as PNG (saved once per distinct image content)."""
    key = image_key(image)
    with _lock:
        path = _files.get(key)
        if path is not None and os.path.exists(path):
            _files.move_to_end(key)
            return path
        path = str(app_subfolder("images") / f"{key}.png")
        image.save(path, format="PNG")
        _files[key] = path
        while len(_files) > MAX_FILES:
            _, oldest = _files.popitem(last=False)
            Path(oldest).unlink(missing_ok=True)
        return path

