"""Where IMG Studio keeps what it downloads or builds once: one rule, read at call time (never baked in at
import) by the model preparation (img_core.weights.prepare), the MLLM specs (img_core.mllm.specs), the
cached release questions (img_core.questions) and the tiny offline models (img_core.tiny.models). No
imports of the project, so any module can use it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "IMG_STUDIO_CACHE"  # where converted models and cached files go; /data/... on Spaces
DEFAULT_CACHE_DIR = Path("~/.cache/img-studio")
TINY_DIR_ENV = "IMG_TINY_DIR"  # an explicit folder for the tiny models (tests build them into a temporary one)
TINY_SUBFOLDER = "tiny"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"  # shipped data: question templates, prompt sets


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $IMG_STUDIO_CACHE (when set and not empty), else ~/.cache/img-studio."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def tiny_models_root(tiny_dir: str | Path | None = None) -> Path:
    """Where the tiny models are built: `tiny_dir`, else $IMG_TINY_DIR (when set and not empty), else
    `cache_root()/tiny` (so $IMG_STUDIO_CACHE moves them too)."""
    explicit = tiny_dir or os.environ.get(TINY_DIR_ENV)
    return Path(explicit).expanduser() if explicit else cache_root() / TINY_SUBFOLDER
