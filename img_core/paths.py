"""Where IMG Studio keeps what it downloads or builds once: one rule, read by the model preparation
(img_core.weights.prepare) and the cached release questions (img_core.questions). No imports of the project, so
any module can use it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "IMG_STUDIO_CACHE"  # where converted models and cached files go; /data/... on Spaces
DEFAULT_CACHE_DIR = Path("~/.cache/img-studio")
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"  # shipped data: question templates, prompt sets


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $IMG_STUDIO_CACHE (when set and not empty), else ~/.cache/img-studio."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()
