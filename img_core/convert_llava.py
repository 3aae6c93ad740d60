"""Convert a checkpoint in the ORIGINAL LLaVA code-base layout into a transformers LLaVA folder.

The authors ship their fine-tuned LLaVA-1.5-13B as the original code-base saves it (REFERENCE §5):
config.json with `LlavaLlamaForCausalLM`, `mm_projector_type: mlp2x_gelu`, `mm_vision_tower`,
`mm_vision_select_layer: -2`, `image_aspect_ratio: pad`; weights (.bin or .safetensors, maybe sharded) named

    model.embed_tokens.* / model.layers.* / model.norm.*  -> language model (LlamaModel)
    lm_head.weight                                        -> lm_head
    model.mm_projector.0.* / model.mm_projector.2.*       -> multi_modal_projector.linear_1 / linear_2
    model.vision_tower.*  (if present)                    -> dropped: the original loader re-reads the tower
                                                             from `mm_vision_tower`, so does this converter

and a Llama tokenizer. The output is a `LlavaForConditionalGeneration` + `LlavaProcessor` folder that
`MLLMCritic` loads with plain `from_pretrained`:

  * the tokenizer gets `<image>` and `<pad>` special tokens; the embedding matrix and `lm_head` grow by
    as many rows, initialised to the mean of the existing rows (the `<image>` rows are never read: image
    features replace them; `<pad>` never occurs in batch-1 inputs; a mean `lm_head` row keeps their logits
    at the average so greedy decoding does not pick them);
  * the CLIP vision tower and its image processor come from `vision_tower` (hub id or folder);
  * `img_studio_mllm.json` records the chat template and aspect mode (`mllm.spec_from_folder` reads it).

The model is assembled on the meta device and the loaded tensors are assigned, so peak memory is about
one copy of the checkpoint. Source folders with only a sentencepiece `tokenizer.model` (no
tokenizer.json) need the `sentencepiece` and `protobuf` packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from img_core.errors import IMGError, InvalidInputError, WeightsNotFoundError
from img_core.mllm import CONVERSION_RECORD, LLAVA_IMAGE_TOKEN

logger = logging.getLogger(__name__)

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATES = ("llava-v0", "llava-v1")
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


def add_image_and_pad_tokens(tokenizer) -> None:
    """Add `<image>` then `<pad>` as special tokens (llava-hf's order: 32000, 32001) and make `<pad>` the
    pad token. Tokens already in the vocabulary keep their ids."""
    from tokenizers import AddedToken

    def special(token: str) -> AddedToken:
        return AddedToken(token, special=True, normalized=False)

    if LLAVA_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [special(LLAVA_IMAGE_TOKEN)]})
    tokenizer.add_special_tokens({"pad_token": special(PAD_TOKEN)})


def rename_original_key(key: str) -> tuple[str, str] | None:
    """Original LLaVA key -> (target module, key inside it), or None for keys that are dropped."""
    if key.startswith("model.vision_tower.") or key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.mm_projector."):
        index, rest = key.removeprefix("model.mm_projector.").split(".", 1)
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        if linear is None:
            raise InvalidInputError(f"unexpected projector key {key}: mlp2x_gelu has layers 0 and 2 only")
        return "multi_modal_projector", f"{linear}.{rest}"
    if key == "lm_head.weight":
        return "lm_head", "weight"
    if key.startswith("model."):
        return "language_model", key.removeprefix("model.")
    raise InvalidInputError(f"unexpected key {key} in an original LLaVA checkpoint")


def weight_files(source: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors shards if any, else pytorch_model*.bin shards."""
    files = sorted(source.glob("model*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise WeightsNotFoundError(f"{source} holds no model*.safetensors or pytorch_model*.bin weights")
    return files


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One shard; .bin files are read with `weights_only=True` (never arbitrary pickles)."""
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
) -> Path:
    """Convert the original-layout LLaVA folder `source` into a transformers folder `output_dir`.

    dtype defaults to the checkpoint's `torch_dtype` (float16 if it has none). Returns `output_dir`."""
    from accelerate import init_empty_weights
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    # 1. check inputs
    source, output_dir = Path(source).expanduser(), Path(output_dir).expanduser()
    if chat_template not in CHAT_TEMPLATES:
        raise InvalidInputError(f"chat_template must be one of {CHAT_TEMPLATES}, got {chat_template!r}")
    original = read_original_config(source)
    dtype = dtype or DTYPES.get(str(original.get("torch_dtype")), torch.float16)
    original_tower = original.get("mm_vision_tower")
    if original_tower and Path(str(original_tower)).name != Path(str(vision_tower)).name:
        logger.warning("checkpoint was trained with vision tower %s but %s is used", original_tower, vision_tower)

    # 2. tokenizer: add <image> and <pad>
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (ImportError, ValueError, OSError) as error:
        raise InvalidInputError(
            f"cannot read the tokenizer of {source} ({error}). A folder with only tokenizer.model needs "
            "`pip install sentencepiece protobuf`."
        ) from error
    add_image_and_pad_tokens(tokenizer)

    # 3. vision tower and its image processor
    try:
        vision_model = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=dtype)
        image_processor = CLIPImageProcessor.from_pretrained(str(vision_tower))
    except OSError as error:
        raise WeightsNotFoundError(
            f"vision tower {vision_tower} not found ({str(error).splitlines()[0]}). On a machine with internet "
            f"run `huggingface-cli download {vision_tower}` and copy the cache here, or pass a local folder."
        ) from error

    # 4. weights: rename, group per module, grow the vocabulary rows
    modules = ("language_model", "multi_modal_projector", "lm_head")
    grouped: dict[str, dict[str, torch.Tensor]] = {module: {} for module in modules}
    dropped = []
    for path in weight_files(source):
        for key, tensor in load_weight_file(path).items():
            target = rename_original_key(key)
            if target is None:
                dropped.append(key)
                continue
            module, name = target
            grouped[module][name] = tensor.to(dtype)
    if any(key.startswith("model.vision_tower.") for key in dropped):
        logger.warning("dropped the checkpoint's own vision tower weights; the tower comes from %s", vision_tower)
    embeddings = grouped["language_model"]["embed_tokens.weight"]  # (V, D)
    old_rows = embeddings.shape[0]
    vocab_size = max(old_rows, len(tokenizer))
    grouped["language_model"]["embed_tokens.weight"] = grow_rows(embeddings, vocab_size)
    grouped["lm_head"]["weight"] = grow_rows(grouped["lm_head"]["weight"], vocab_size)

    # 5. transformers config
    text_config = LlamaConfig(
        **{key: original[key] for key in LLAMA_CONFIG_KEYS if original.get(key) is not None},
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = vision_model.config
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

    # 6. assemble on the meta device, assign the tensors, save
    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(grouped["language_model"], strict=True, assign=True)
    model.model.multi_modal_projector.load_state_dict(grouped["multi_modal_projector"], strict=True, assign=True)
    model.lm_head.load_state_dict(grouped["lm_head"], strict=True, assign=True)
    model.model.vision_tower.load_state_dict(vision_model.state_dict(), strict=True, assign=True)
    model.config.dtype = dtype
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size="5GB")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    processor.save_pretrained(output_dir)
    added_tokens = (LLAVA_IMAGE_TOKEN, PAD_TOKEN)
    record = {
        "chat_template": chat_template,
        "image_aspect": "pad" if original.get("image_aspect_ratio", "pad") == "pad" else "native",
        "source": str(source),
        "vision_tower": str(vision_tower),
        "added_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in added_tokens},
        "converted_by": "img_core.convert_llava",
    }
    (output_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("converted %s -> %s (%s, vocabulary %d -> %d)", source, output_dir, dtype, old_rows, vocab_size)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m img_core convert-llava --source DIR --out DIR [--vision-tower ID] [--chat-template T]`."""
    parser = argparse.ArgumentParser(
        prog="python -m img_core convert-llava",
        description="Convert an original-layout LLaVA checkpoint (e.g. shi-labs/IMG llava/) to transformers.",
    )
    parser.add_argument("--source", required=True, help="folder in the original LLaVA code-base layout")
    parser.add_argument("--out", required=True, help="output folder (transformers LlavaForConditionalGeneration)")
    parser.add_argument("--vision-tower", default=DEFAULT_VISION_TOWER, help="CLIP vision tower hub id or folder")
    parser.add_argument(
        "--chat-template", default="llava-v0", choices=CHAT_TEMPLATES,
        help="template the checkpoint was fine-tuned with (IMG's `llava` folder: llava-v0)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's torch_dtype")
    args = parser.parse_args(argv)
    try:
        out = convert_llava_checkpoint(
            args.source,
            Path(args.out),
            vision_tower=args.vision_tower,
            chat_template=args.chat_template,
            dtype=DTYPES[args.dtype] if args.dtype else None,
        )
    except IMGError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.source} -> {out}")
    return 0
