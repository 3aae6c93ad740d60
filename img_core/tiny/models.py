"""Builds the whole tiny offline stack once: diffusion pipelines, IP-Adapters, MLLMs and aligners.

`ensure_tiny_models(base)` returns a folder whose subfolders stand in for hub repos (see
tiny_diffusion.py and tiny_mllm.py). It builds into a private temporary folder and renames it into
place, so parallel processes (pytest workers, an app and a CLI) never see half-written weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from img_core.aligner import (
    FLUX_FEATURES,
    SDXL_FEATURES,
    AlignerConfig,
    ImplicitAligner,
)
from img_core.paths import tiny_models_root
from img_core.tiny.diffusion import (
    FLUX_IP_TOKENS,
    FLUX_JOINT_ATTENTION_DIM,
    SDXL_CROSS_ATTENTION_DIM,
    SDXL_IP_TOKENS,
    build_tiny_flux,
    build_tiny_sdxl,
)
from img_core.tiny.mllm import build_tiny_llava, build_tiny_qwen

TINY_VERSION = "v2"  # bump when the tiny architectures change, so stale caches are rebuilt
TINY_GUIDANCE_DIM = 64  # hidden size of tiny-llava and tiny-qwen


def ensure_tiny_models(base: Path | None = None, seed: int = 0) -> Path:
    """Build the tiny models under `base` (default: `img_core.paths.tiny_models_root()`, i.e. $IMG_TINY_DIR,
    else <cache root>/tiny) if missing."""
    base = tiny_models_root(base)
    if (base / "COMPLETE").is_file():  # already the models folder (a loaded session's tiny_root)
        return base
    target = base / TINY_VERSION
    if (target / "COMPLETE").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
    try:
        build_all(building, seed)
        (building / "COMPLETE").write_text(f"seed={seed}\n")
        try:
            os.rename(building, target)
        except OSError:
            if not (target / "COMPLETE").is_file():  # neither ours nor someone else's: a real failure
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def build_all(root: Path, seed: int = 0) -> None:
    build_tiny_sdxl(root, seed)
    build_tiny_flux(root, seed)
    build_tiny_llava(root / "tiny-llava", seed)
    build_tiny_qwen(root / "tiny-qwen", seed)
    build_tiny_aligner(root / "tiny-aligner-sdxl", SDXL_CROSS_ATTENTION_DIM, SDXL_IP_TOKENS, SDXL_FEATURES, "tiny-llava", seed)
    build_tiny_aligner(root / "tiny-aligner-flux", FLUX_JOINT_ATTENTION_DIM, FLUX_IP_TOKENS, FLUX_FEATURES, "tiny-qwen", seed)


def build_tiny_aligner(
    out_dir: Path, image_dim: int, num_tokens: int, feature_kind: str, mllm: str, seed: int = 0
) -> Path:
    """A tiny aligner whose zero_linear is random (not zero), so it visibly changes the features."""

    torch.manual_seed(seed)
    config = AlignerConfig(
        image_dim=image_dim,
        guidance_dim=TINY_GUIDANCE_DIM,
        depth=2,
        heads=2,
        dim_head=16,
        num_image_tokens=num_tokens,
        image_feature_kind=feature_kind,
        mllm=mllm,
        guidance_mode="question",
        chat_template=None,
        training_steps=0,
    )
    aligner = ImplicitAligner(config)
    torch.nn.init.normal_(aligner.zero_linear.weight, std=0.2)
    aligner.save_pretrained(out_dir)
    return out_dir
