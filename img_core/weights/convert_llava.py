"""Convert a checkpoint in the ORIGINAL LLaVA code-base layout into a transformers LLaVA folder.

The authors ship their fine-tuned LLaVA-1.5-13B as the original code-base saves it (REFERENCE §5):
config.json with `LlavaLlamaForCausalLM`, `mm_projector_type: mlp2x_gelu`, `mm_vision_tower`,
`mm_vision_select_layer: -2`, `image_aspect_ratio: pad`; weights (.bin or .safetensors, maybe sharded) named

    model.embed_tokens.* / model.layers.* / model.norm.*  -> model.language_model.*
    lm_head.weight                                        -> lm_head.weight
    model.mm_projector.0.* / model.mm_projector.2.*       -> model.multi_modal_projector.linear_1.* / linear_2.*
    model.vision_tower.vision_tower.*  (if present)       -> model.vision_tower.*  when the config sets
                                                             `unfreeze_mm_vision_tower`, else dropped

and a Llama tokenizer. The vision tower rule is the original loader's (haotian-liu/LLaVA c121f04,
`CLIPVisionTower.__init__`): with `unfreeze_mm_vision_tower` the tower is built before the checkpoint's
weights are loaded, so its tuned weights replace the CLIP ones; without it the tower is loaded from
`mm_vision_tower` afterwards and any tower weights in the checkpoint are ignored.

The output is a `LlavaForConditionalGeneration` + `LlavaProcessor` folder that `MLLMCritic` loads with
plain `from_pretrained`:

  * the tokenizer gets `<image>` and `<pad>` special tokens; the embedding matrix and `lm_head` grow by
    as many rows, initialised to the mean of the existing rows (the `<image>` rows are never read: image
    features replace them; `<pad>` never occurs in batch-1 inputs; a mean `lm_head` row keeps their logits
    at the average so greedy decoding does not pick them);
  * the CLIP vision tower config and image processor come from `vision_tower` (hub id or folder), and its
    weights too unless the checkpoint carries a tuned tower;
  * `img_studio_mllm.json` records the chat template and aspect mode (`mllm.spec_from_folder` reads it).

Conversion runs shard by shard, so peak memory is one original shard and peak disk is the output plus one
original shard when `delete_source_shards` is set. It writes into a temporary folder next to the output
(`.<name>.partial`) with a journal of the shards done; a run that is killed resumes there, and the folder
is renamed to the output only when complete, with a completion marker (`img_core.weights.prepare`), and only
after a smoke forward of the converted folder (tokenize, one guidance pass on a tiny image) succeeded. Source
folders with only a sentencepiece `tokenizer.model` (no tokenizer.json) need `sentencepiece` + `protobuf`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from img_core.clip_processing import pil_clip_image_processor
from img_core.errors import IMGError, InvalidInputError, WeightsNotFoundError
from img_core.mllm.chat import LLAVA_IMAGE_TOKEN
from img_core.mllm.converted import (
    JOURNAL,
    check_prepared_folder,
    is_prepared,
    partial_folder,
    write_completion_marker,
)
from img_core.mllm.critic import MLLMCritic
from img_core.mllm.specs import CONVERSION_RECORD, spec_from_folder

logger = logging.getLogger(__name__)

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATES = ("llava-v0", "llava-v1")
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower."  # CLIPVisionTower.vision_tower (a CLIPVisionModel)
# Llama settings carried from the original config.json into the transformers text config.
LLAMA_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# progress(stage, done, total, unit), as in img_core.weights.prepare
ProgressCallback = Callable[[str, float, float, str | None], None]


class PreparationBusyError(IMGError, RuntimeError):
    """Another process is preparing or converting the same model and did not finish in time."""


def conversion_lock_path(output_dir: Path) -> Path:
    """The lock file of a conversion into `output_dir` (`.<name>.lock` next to it): `prepare` and the
    `convert-llava` command both hold it while they write that folder."""
    output_dir = Path(output_dir).expanduser()
    return output_dir.with_name(f".{output_dir.name}.lock")


@contextmanager
def exclusive_lock(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (one preparation or conversion of a folder at a time, across
    processes such as a `prepare` command, a `convert-llava` command and an app starting); waits for it,
    up to `timeout_s` when given."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(path, "a") as handle:
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise PreparationBusyError(
                        f"another process is preparing {path.name.removesuffix('.lock').lstrip('.')} "
                        f"(lock {path}): wait for it to finish"
                    ) from None
                if not waiting:
                    logger.warning("waiting for another process that is preparing the same model (%s)", path)
                    waiting = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_image_and_pad_tokens(tokenizer) -> None:
    """Add `<image>` then `<pad>` as special tokens (llava-hf's order: 32000, 32001) and make `<pad>` the
    pad token. Tokens already in the vocabulary keep their ids."""
    from tokenizers import AddedToken

    def special(token: str) -> AddedToken:
        return AddedToken(token, special=True, normalized=False)

    if LLAVA_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [special(LLAVA_IMAGE_TOKEN)]})
    tokenizer.add_special_tokens({"pad_token": special(PAD_TOKEN)})


def rename_original_key(key: str, tower_keys: set[str], keep_tower: bool) -> str | None:
    """Original LLaVA key -> key of `LlavaForConditionalGeneration.state_dict()`, or None if dropped.

    `tower_keys` are the vision tower's own state-dict keys; the original (transformers 4.x) CLIP keys
    carry a `vision_model.` prefix that transformers 5's CLIPVisionModel no longer has."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.vision_tower."):
        if not keep_tower:
            return None
        inner = key.removeprefix(ORIGINAL_TOWER_PREFIX)
        for candidate in (inner, inner.removeprefix("vision_model.")):
            if candidate in tower_keys:
                return f"model.vision_tower.{candidate}"
        if inner.endswith("position_ids"):  # a non-persistent buffer some versions saved
            return None
        raise InvalidInputError(f"unexpected vision tower key {key} in an original LLaVA checkpoint")
    if key.startswith("model.mm_projector."):
        index, rest = key.removeprefix("model.mm_projector.").split(".", 1)
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        if linear is None:
            raise InvalidInputError(f"unexpected projector key {key}: mlp2x_gelu has layers 0 and 2 only")
        return f"model.multi_modal_projector.{linear}.{rest}"
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    raise InvalidInputError(f"unexpected key {key} in an original LLaVA checkpoint")


def source_shard_names(source: Path) -> list[str]:
    """The checkpoint's weight files, from its index (pytorch_model.bin / model.safetensors .index.json)
    or else by name: safetensors shards if any, else pytorch_model*.bin shards."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = source / index_name
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(source.glob("model*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise WeightsNotFoundError(f"{source} holds no model*.safetensors or pytorch_model*.bin weights")
    return [path.name for path in files]


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One shard; .bin files are read with `weights_only=True` (never arbitrary pickles)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint shard {path} is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """`matrix` with extra rows, each the mean of the existing rows, up to `rows` rows."""
    extra = rows - matrix.shape[0]
    if extra <= 0:
        return matrix
    mean_row = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean_row.expand(extra, -1)], dim=0)


def read_original_config(source: Path) -> dict:
    """config.json of the original checkpoint, checked for what this converter supports."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{config_path} is missing: {source} is not a LLaVA checkpoint folder")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if "LlavaLlamaForCausalLM" not in architectures and config.get("model_type") not in ("llava", "llava_llama"):
        raise InvalidInputError(
            f"{source} is not an original LLaVA checkpoint (architectures {architectures}, "
            f"model_type {config.get('model_type')!r})"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise InvalidInputError(f"mm_projector_type {projector!r} is not supported: only mlp2x_gelu (LLaVA-1.5)")
    if config.get("mm_use_im_start_end"):
        raise InvalidInputError("mm_use_im_start_end checkpoints are not supported (LLaVA-1.5 does not use them)")
    return config


def convert_llava_checkpoint(
    source: str | Path,
    output_dir: Path,
    vision_tower: str | Path = DEFAULT_VISION_TOWER,
    chat_template: str = "llava-v0",
    dtype: torch.dtype | None = None,
    delete_source_shards: bool = False,
    shard_names: list[str] | None = None,
    fetch_shard: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert the original-layout LLaVA folder `source` into a transformers folder `output_dir`.

    dtype defaults to the checkpoint's `torch_dtype` (float16 if it has none). `shard_names` defaults to
    `source_shard_names(source)`; `fetch_shard(name)` is called before a shard is read (a just-in-time
    download) and only for shards not converted yet; `delete_source_shards` removes each original shard
    once converted. Resumes an interrupted conversion with the same settings. Returns `output_dir`."""
    from accelerate import init_empty_weights
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    report = progress or (lambda stage, done, total, unit: None)

    # 1. check inputs; a complete partial folder (killed before its rename) only needs renaming
    source, output_dir = Path(source).expanduser(), Path(output_dir).expanduser()
    if is_prepared(partial_folder(output_dir)):
        logger.info("%s was converted completely before an interruption: moving it into place", output_dir)
        _finish(partial_folder(output_dir), output_dir)
        return output_dir
    if chat_template not in CHAT_TEMPLATES:
        raise InvalidInputError(f"chat_template must be one of {CHAT_TEMPLATES}, got {chat_template!r}")
    original = read_original_config(source)
    dtype = dtype or DTYPES.get(str(original.get("torch_dtype")), torch.float16)
    original_tower = original.get("mm_vision_tower")
    if original_tower and _tower_name(original_tower) != _tower_name(vision_tower):
        logger.warning("checkpoint was trained with vision tower %s but %s is used", original_tower, vision_tower)
    keep_tower = bool(original.get("unfreeze_mm_vision_tower", False))
    shard_names = list(shard_names) if shard_names is not None else source_shard_names(source)

    # 2. tokenizer: the checkpoint's Llama tokenizer, named explicitly (with `model_type: "llava"` in the
    # original config AutoTokenizer builds another class); add <image> and <pad>
    try:
        tokenizer = LlamaTokenizer.from_pretrained(source)
    except (ImportError, ValueError, OSError) as error:
        raise InvalidInputError(
            f"cannot read the tokenizer of {source} ({error}). A folder with only tokenizer.model needs "
            "`pip install sentencepiece protobuf`."
        ) from error
    add_image_and_pad_tokens(tokenizer)

    # 3. vision tower config and image processor (weights later, only where the checkpoint has none)
    try:
        vision_config = CLIPVisionConfig.from_pretrained(str(vision_tower))
        image_processor = CLIPImageProcessor.from_pretrained(str(vision_tower))
    except OSError as error:
        raise _tower_not_found(vision_tower, error) from error

    # 4. transformers config; the model on the meta device gives the expected keys and shapes
    vocab_size = max(int(original.get("vocab_size") or 0), len(tokenizer))
    text_config = LlamaConfig(
        **{key: original[key] for key in LLAMA_CONFIG_KEYS if original.get(key) is not None},
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    select_feature = original.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",  # mlp2x_gelu = Linear -> GELU -> Linear
        vision_feature_select_strategy="default" if select_feature == "patch" else "full",
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True,
    )
    config.dtype = dtype
    with init_empty_weights():
        expected = {key: tuple(t.shape) for key, t in LlavaForConditionalGeneration(config).state_dict().items()}
    tower_keys = {key.removeprefix("model.vision_tower.") for key in expected if key.startswith("model.vision_tower.")}

    # 5. convert shard by shard into the partial folder, resuming a run with the same settings
    settings = {
        "source_shards": shard_names,
        "dtype": str(dtype).removeprefix("torch."),
        "vision_tower": str(vision_tower),
        "chat_template": chat_template,
        "keep_tower": keep_tower,
        "vocab_size": vocab_size,
    }
    partial = partial_folder(output_dir)
    journal = _read_journal(partial)
    if journal.get("settings") != settings:
        if partial.exists():
            logger.info("restarting the conversion in %s (no journal, or other settings)", partial)
            shutil.rmtree(partial)
        journal = {"settings": settings, "done": [], "dropped_tower_tensors": 0}
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / JOURNAL, journal)
    total_shards = len(shard_names) + 1  # + one shard for the vision tower weights the checkpoint lacks
    for number, name in enumerate(shard_names, start=1):
        output_name = _output_shard_name(number, total_shards)
        if name in journal["done"] and (partial / output_name).is_file():
            report("converting shard", number, total_shards, None)
            continue
        if fetch_shard is not None:
            fetch_shard(name)
        converted: dict[str, torch.Tensor] = {}
        for key, tensor in load_weight_file(source / name).items():
            target = rename_original_key(key, tower_keys, keep_tower)
            if target is None:
                journal["dropped_tower_tensors"] += key.startswith("model.vision_tower.")
                continue
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                tensor = grow_rows(tensor, vocab_size)
            converted[target] = _checked(target, tensor.to(dtype), expected)
        _save_shard(converted, partial / output_name)
        del converted
        journal["done"].append(name)
        _write_json(partial / JOURNAL, journal)
        if delete_source_shards:
            (source / name).unlink(missing_ok=True)
        report("converting shard", number, total_shards, None)
    if journal["dropped_tower_tensors"]:
        logger.warning(
            "dropped %d vision tower tensors of the checkpoint: its config does not set unfreeze_mm_vision_tower, "
            "so the original loader reads the tower from %s, and so does this conversion",
            journal["dropped_tower_tensors"], original_tower or vision_tower,
        )

    # 6. the vision tower weights the checkpoint did not provide, from `vision_tower`
    written = _written_keys(partial, total_shards - 1)
    missing_tower = sorted(key for key in expected if key.startswith("model.vision_tower.") and key not in written)
    if keep_tower and len(missing_tower) == len(tower_keys):
        logger.warning("the config sets unfreeze_mm_vision_tower but the checkpoint holds no vision tower "
                       "weights; using those of %s", vision_tower)
    tower_tensors = _base_tower_tensors(vision_tower, missing_tower, dtype) if missing_tower else {}
    _save_shard({key: _checked(key, t, expected) for key, t in tower_tensors.items()},
                partial / _output_shard_name(total_shards, total_shards))
    report("converting shard", total_shards, total_shards, None)

    # 7. check completeness, then index, config, processor, record and the completion marker
    weight_map = _weight_map(partial, total_shards)
    missing, unexpected = sorted(set(expected) - set(weight_map)), sorted(set(weight_map) - set(expected))
    if missing or unexpected:
        raise InvalidInputError(
            f"converting {source} did not give a complete LLaVA model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    _write_json(partial / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    processor.save_pretrained(partial)
    record = {
        "chat_template": chat_template,
        "image_aspect": "pad" if original.get("image_aspect_ratio", "pad") == "pad" else "native",
        "source": str(source),
        "vision_tower": str(vision_tower),
        "vision_tower_weights": "checkpoint (unfreeze_mm_vision_tower)" if keep_tower and not missing_tower
        else str(vision_tower),
        "added_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in (LLAVA_IMAGE_TOKEN, PAD_TOKEN)},
        "converted_by": "img_core.weights.convert_llava",
    }
    _write_json(partial / CONVERSION_RECORD, record)
    smoke_forward(partial)  # raises before the folder is marked complete: a rerun redoes only these steps
    write_completion_marker(partial)  # (the journal is not listed in it)
    _finish(partial, output_dir)
    logger.info("converted %s -> %s (%s, vocabulary %d)", source, output_dir, dtype, vocab_size)
    return output_dir


def smoke_forward(folder: Path, smoke_layers: int = 1) -> torch.Tensor:
    """Load the converted `folder` as the app will (processor, chat template, LLaVA model) with its language
    model cut to its first `smoke_layers` layers (LLaVA-13B: ~3 GB in float32 instead of 26 GB in fp16),
    and compute the guidance of a prompt about a tiny image. Raises InvalidInputError when that fails (a
    tokenizer, processor or image-token count that does not fit the model). Returns the guidance."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    config = LlavaConfig.from_pretrained(folder)
    config.text_config.num_hidden_layers = min(smoke_layers, config.text_config.num_hidden_layers)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        processor.image_processor = pil_clip_image_processor(processor.image_processor)
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the layers left out would be listed as "unexpected"
        try:
            model = LlavaForConditionalGeneration.from_pretrained(folder, config=config, dtype=torch.float32).eval()
        finally:
            transformers_logging.set_verbosity(verbosity)
        critic = MLLMCritic(spec_from_folder(folder), model, processor, "none", "cpu", torch.float32)
        guidance = critic.guidance(Image.new("RGB", (24, 16), (120, 60, 30)), "a small brown square")
    except Exception as error:  # any failure of the converted folder: the conversion is not complete
        raise InvalidInputError(
            f"the converted model in {folder} failed its smoke forward ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it was not marked complete"
        ) from error
    if not torch.isfinite(guidance).all():
        raise InvalidInputError(f"the converted model in {folder} gives non-finite guidance: not marked complete")
    del model
    logger.info("smoke forward of %s passed: guidance %s", folder, tuple(guidance.shape))
    return guidance


def _tower_name(vision_tower: str | Path) -> str:
    """"clip-vit-large-patch14-336" for a hub id, a folder of that name, or its Hugging Face cache snapshot."""
    parts = Path(str(vision_tower)).parts
    cached = [part for part in parts if part.startswith("models--")]
    return cached[-1].split("--")[-1] if cached else (parts[-1] if parts else "")


def _output_shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _checked(key: str, tensor: torch.Tensor, expected: dict[str, tuple]) -> torch.Tensor:
    """The tensor, contiguous, after checking its shape and that every value is finite."""
    if key in expected and tuple(tensor.shape) != expected[key]:
        raise InvalidInputError(f"{key} has shape {tuple(tensor.shape)}, the config needs {expected[key]}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InvalidInputError(f"{key} holds NaN or infinite values: the checkpoint is damaged, download it again")
    return tensor.contiguous()


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors shard atomically (a file of that name is always complete)."""
    from safetensors.torch import save_file

    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, path)


def _written_keys(folder: Path, shards: int) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for number in range(1, shards + 1):
        path = folder / _output_shard_name(number, shards + 1)
        with safe_open(str(path), "pt") as shard:
            keys.update(shard.keys())
    return keys


def _weight_map(folder: Path, total: int) -> dict[str, str]:
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    for number in range(1, total + 1):
        name = _output_shard_name(number, total)
        with safe_open(str(folder / name), "pt") as shard:
            weight_map.update({key: name for key in shard.keys()})
    return weight_map


def _base_tower_tensors(vision_tower: str | Path, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The given `model.vision_tower.*` keys, from the CLIP vision tower `vision_tower`."""
    from transformers import CLIPVisionModel

    try:
        tower = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=dtype)
    except OSError as error:
        raise _tower_not_found(vision_tower, error) from error
    state = tower.state_dict()
    return {key: state[key.removeprefix("model.vision_tower.")] for key in keys}


def _tower_not_found(vision_tower: str | Path, error: Exception) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"vision tower {vision_tower} not found ({str(error).splitlines()[0]}). On a machine with internet "
        f"run `hf download {vision_tower}` and copy the cache here, or pass a local folder."
    )


def _read_journal(partial: Path) -> dict:
    try:
        return json.loads((partial / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _finish(complete: Path, output_dir: Path) -> None:
    """Drop the journal of the complete partial folder and move it into place (see `_replace_folder`)."""
    (complete / JOURNAL).unlink(missing_ok=True)
    _replace_folder(complete, output_dir)


def previous_folder(output_dir: Path) -> Path:
    """Where `_replace_folder` parks the copy it replaces (`.<name>.previous`), until the new one is in place."""
    return output_dir.with_name(f".{output_dir.name}.previous")


def remove_stale_copies(output_dir: Path) -> None:
    """Delete a replaced copy left by an interrupted `_replace_folder` once `output_dir` is complete (a
    full model's worth of disk otherwise kept forever)."""
    previous = previous_folder(output_dir)
    if previous.exists() and is_prepared(output_dir):
        logger.info("removing %s, left by an interrupted replacement", previous)
        shutil.rmtree(previous, ignore_errors=True)


def _replace_folder(complete: Path, output_dir: Path) -> None:
    """Rename `complete` to `output_dir`; an existing `output_dir` is replaced only after that succeeds.

    Every interruption leaves a state the next run finishes without converting again: the complete
    partial folder is renamed (with or without a parked previous copy), and a parked copy is removed."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = previous_folder(output_dir)
    if output_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(output_dir, previous)
    os.rename(complete, output_dir)
    shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------------------------- hub push


def check_push_target(repo_id: str) -> None:
    """Refuse a malformed hub repo id, or pushing while HF_HUB_OFFLINE is set, before any work is done."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise InvalidInputError(f"--push-to-hub needs a repo id of the form owner/name, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InvalidInputError(f"--push-to-hub: {repo_id!r} is not a valid hub repo id ({error})") from error
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise InvalidInputError("--push-to-hub needs the hub, but HF_HUB_OFFLINE is set: unset it and log in")


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a complete converted folder to hub model repo `repo_id` (created if needed); returns its URL."""
    check_push_target(repo_id)
    check_prepared_folder(folder, is_conversion=True)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="IMG LLaVA converted by img_core.weights.convert_llava")
    return f"https://huggingface.co/{repo_id}"
