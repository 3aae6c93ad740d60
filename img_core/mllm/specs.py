"""Which MLLMs IMG Studio knows and how to find their weights: `MLLMSpec`, `KNOWN_MLLMS`, `resolve_spec`.

A spec names the model (hub id or local transformers-format folder), its family, its chat template (an
explicit, recorded setting: the release picks it from the checkpoint folder name, REFERENCE §5), the width
of its guidance features and how images are fitted (padded to a square for LLaVA-1.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from img_core.errors import InvalidInputError, WeightsNotFoundError
from img_core.paths import DEFAULT_CACHE_DIR, cache_root

FAMILIES = ("llava", "qwen2_5_vl")
CHAT_TEMPLATES = ("llava-v0", "llava-v1", "qwen2.5-vl")
IMAGE_ASPECTS = ("pad", "native")  # pad to square first (LLaVA-1.5) or give the processor the image as is

# A converted checkpoint folder records how it was converted (chat template, aspect mode) in this file.
CONVERSION_RECORD = "img_studio_mllm.json"

HUB_FETCH_HINT = (
    "On a machine with internet run `hf download {model_id}` and copy the Hugging Face cache "
    "(~/.cache/huggingface/hub) to this machine, or pass the downloaded folder as the model id."
)


@dataclass(frozen=True)
class MLLMSpec:
    """Which MLLM to load and how to talk to it. Recorded with every guidance configuration."""

    name: str
    model_id: str  # hub id or local folder (transformers format)
    family: str  # "llava" | "qwen2_5_vl"
    chat_template: str  # "llava-v0" | "llava-v1" | "qwen2.5-vl"
    hidden_size: int  # Dg, width of the guidance features (metadata; checked against the loaded config)
    image_aspect: str = "pad"  # "pad" | "native"
    tiny: bool = False  # a tiny test model: model_id is a folder name under the tiny models root
    in_cache: bool = False  # model_id is a folder name under the cache root (`cache_root()`, read at call time)
    context_length: int | None = None  # None: the language model's max_position_embeddings
    fetch_hint: str = ""  # how to get the weights, shown when they are missing

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidInputError(f"MLLM family must be one of {FAMILIES}, got {self.family!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise InvalidInputError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")
        if (self.family == "qwen2_5_vl") != (self.chat_template == "qwen2.5-vl"):
            raise InvalidInputError(f"chat_template {self.chat_template!r} does not fit family {self.family!r}")
        if self.image_aspect not in IMAGE_ASPECTS:
            raise InvalidInputError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {self.image_aspect!r}")


KNOWN_MLLMS: dict[str, MLLMSpec] = {
    "img-llava-13b": MLLMSpec(
        name="img-llava-13b",
        model_id="img-llava-13b-hf",
        family="llava",
        chat_template="llava-v0",  # the release's folder is named `llava`, which selects conv_llava_v0
        hidden_size=5120,
        in_cache=True,
        fetch_hint=(
            "With internet access, `python -m img_core prepare --preset sdxl` downloads the `llava/` folder of "
            "shi-labs/IMG and converts it into the cache once (the app and the CLI do this on first use). "
            "Offline: copy a prepared img-llava-13b-hf folder into the cache folder ($IMG_STUDIO_CACHE, default "
            f"{DEFAULT_CACHE_DIR}), or convert a downloaded folder with `python -m img_core convert-llava --source "
            "IMG/llava --out <cache folder>/img-llava-13b-hf`."
        ),
    ),
    "llava-1.5-13b": MLLMSpec(
        name="llava-1.5-13b",
        model_id="llava-hf/llava-1.5-13b-hf",
        family="llava",
        chat_template="llava-v1",
        hidden_size=5120,
    ),
    "qwen2.5-vl-7b": MLLMSpec(
        name="qwen2.5-vl-7b",
        model_id="Qwen/Qwen2.5-VL-7B-Instruct",
        family="qwen2_5_vl",
        chat_template="qwen2.5-vl",
        hidden_size=3584,
        image_aspect="native",
    ),
    "tiny-llava": MLLMSpec(
        name="tiny-llava",
        model_id="tiny-llava",
        family="llava",
        chat_template="llava-v0",
        hidden_size=64,
        tiny=True,
        fetch_hint="Build it with `img_core.tiny.mllm.build_tiny_llava(<tiny root>/tiny-llava)`.",
    ),
    "tiny-qwen": MLLMSpec(
        name="tiny-qwen",
        model_id="tiny-qwen",
        family="qwen2_5_vl",
        chat_template="qwen2.5-vl",
        hidden_size=64,
        image_aspect="native",
        tiny=True,
        fetch_hint="Build it with `img_core.tiny.mllm.build_tiny_qwen(<tiny root>/tiny-qwen)`.",
    ),
}


def resolve_spec(name_or_spec: str | MLLMSpec, tiny_root: Path | None = None) -> MLLMSpec:
    """A known name (or a known spec's hub id), an `MLLMSpec`, or a local converted folder -> a spec whose
    model_id can be loaded.

    Tiny specs get their folder under `tiny_root` (`<tiny_root>/tiny-llava`); cached ones under the cache
    root as it is now (`cache_root()`: $IMG_STUDIO_CACHE, else ~/.cache/img-studio); `~` is expanded."""
    if isinstance(name_or_spec, MLLMSpec):
        spec = name_or_spec
    elif known_name(name_or_spec) is not None:
        spec = KNOWN_MLLMS[known_name(name_or_spec)]
    elif Path(name_or_spec).expanduser().is_dir():
        spec = spec_from_folder(name_or_spec)
    else:
        raise InvalidInputError(
            f"unknown MLLM {name_or_spec!r}: use one of {sorted(KNOWN_MLLMS)} or a local model folder"
        )
    if spec.tiny and not Path(spec.model_id).is_absolute():
        if tiny_root is None:
            raise InvalidInputError(f"MLLM {spec.name!r} is a tiny test model: pass the tiny models root")
        return replace(spec, model_id=str(Path(tiny_root) / spec.model_id))
    if spec.in_cache and not Path(spec.model_id).expanduser().is_absolute():
        return replace(spec, model_id=str(cache_root() / spec.model_id))
    if looks_like_path(spec.model_id):
        return replace(spec, model_id=str(Path(spec.model_id).expanduser()))
    return spec


def known_name(name_or_model_id: str) -> str | None:
    """The `KNOWN_MLLMS` name of a known name or of a known spec's hub id (llava-hf/llava-1.5-13b-hf ->
    llava-1.5-13b); None for anything else."""
    if name_or_model_id in KNOWN_MLLMS:
        return name_or_model_id
    by_hub_id = {spec.model_id: name for name, spec in KNOWN_MLLMS.items() if not (spec.tiny or spec.in_cache)}
    return by_hub_id.get(name_or_model_id)


def spec_from_folder(folder: str | Path, name: str | None = None) -> MLLMSpec:
    """Spec for a local transformers-format folder. A folder written by `convert_llava` carries its chat
    template in `img_studio_mllm.json`; otherwise the family comes from config.json and the template
    defaults to llava-v1 / qwen2.5-vl."""
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{folder} is not a model folder: {config_path} is missing")
    config = json.loads(config_path.read_text())
    record = read_conversion_record(folder)
    if config.get("model_type") == "llava":
        family, template, hidden = "llava", "llava-v1", config["text_config"]["hidden_size"]
    elif config.get("model_type") == "qwen2_5_vl":
        text_config = config.get("text_config", config)
        family, template, hidden = "qwen2_5_vl", "qwen2.5-vl", text_config["hidden_size"]
    else:
        raise InvalidInputError(f"{folder}: model_type {config.get('model_type')!r} is not a supported MLLM")
    return MLLMSpec(
        name=name or folder.name,
        model_id=str(folder),
        family=family,
        chat_template=record.get("chat_template", template),
        hidden_size=int(hidden),
        image_aspect=record.get("image_aspect", "pad" if family == "llava" else "native"),
    )


def read_conversion_record(folder: str | Path) -> dict:
    """The `img_studio_mllm.json` written by `convert_llava` (empty dict when there is none)."""
    path = Path(folder) / CONVERSION_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def looks_like_path(model_id: str) -> bool:
    """An existing path, or one that starts with / ~ . or does not have the 'owner/name' form of hub ids."""
    if Path(model_id).expanduser().exists():
        return True
    return model_id.startswith(("/", "~", ".")) or model_id.count("/") != 1


def missing_weights_error(spec: MLLMSpec, detail: str) -> WeightsNotFoundError:
    hint = spec.fetch_hint or HUB_FETCH_HINT.format(model_id=spec.model_id)
    return WeightsNotFoundError(f"weights of MLLM {spec.name!r} not found at {spec.model_id} ({detail}). {hint}")
