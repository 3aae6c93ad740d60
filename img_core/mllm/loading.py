"""The one way to load an MLLM: `load_mllm(name) -> MLLMCritic`, used by the session, evaluation's judge,
the VQA scorers, fine-tuning and the benchmarks.

It (1) finds the spec: a known name, a known hub id, a converted folder or an `MLLMSpec`; (2) prepares the
model when it needs it (the release's IMG LLaVA is downloaded and converted into the cache once:
`img_core.weights.prepare`); tiny test models are built once under the tiny models root; (3) loads model
and processor (`MLLMCritic.load`); (4) sets the question source. Every folder comes from the one cache rule
(`img_core.paths`), read when this is called, so $IMG_STUDIO_CACHE and $IMG_TINY_DIR set after import count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from img_core.mllm.critic import MLLMCritic
from img_core.mllm.specs import KNOWN_MLLMS, MLLMSpec, known_name, resolve_spec
from img_core.questions import load_question_source
from img_core.tiny.models import ensure_tiny_models
from img_core.weights.prepare import resolve_prepared_spec

PrepareProgress = Callable[[str, float, float, str | None], None]  # (stage, done, total, unit), as prepare reports


def is_tiny_mllm(name_or_spec: str | MLLMSpec) -> bool:
    """Whether this names one of the tiny random-weight test MLLMs (built, never downloaded)."""
    if isinstance(name_or_spec, MLLMSpec):
        return name_or_spec.tiny
    name = known_name(name_or_spec)
    return name is not None and KNOWN_MLLMS[name].tiny


def resolve_mllm(
    name_or_spec: str | MLLMSpec,
    tiny_root: str | Path | None = None,
    on_progress: PrepareProgress | None = None,
) -> MLLMSpec:
    """The spec to load, its folder ready on disk: prepared into the cache first where needed (IMG LLaVA),
    tiny models built under `tiny_root` (default: `img_core.paths.tiny_models_root()`)."""
    if isinstance(name_or_spec, MLLMSpec):
        unbuilt = name_or_spec.tiny and not Path(name_or_spec.model_id).is_absolute()  # a name, not yet a folder
        return resolve_spec(name_or_spec, ensure_tiny_models(tiny_root) if unbuilt else None)
    name = known_name(name_or_spec) or name_or_spec
    root = ensure_tiny_models(tiny_root) if is_tiny_mllm(name) else None
    return resolve_prepared_spec(name, root, progress=on_progress)


def load_mllm(
    name_or_spec: str | MLLMSpec,
    *,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    questions: str | Path | None = None,
    tiny_root: str | Path | None = None,
    on_progress: PrepareProgress | None = None,
) -> MLLMCritic:
    """A loaded `MLLMCritic` for a name, hub id, folder or spec (see the module doc).

    `quantization` defaults to bnb-nf4 on CUDA and none on CPU; `questions` is a question source
    ("ours", "release" or a JSON file; default ours); `on_progress` hears download/conversion progress."""
    spec = resolve_mllm(name_or_spec, tiny_root, on_progress)
    critic = MLLMCritic.load(spec, device=str(device), dtype=dtype, quantization=quantization)
    critic.questions = load_question_source(questions)
    return critic
