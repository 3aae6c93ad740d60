"""Tiny random-weight MLLMs (LLaVA and Qwen2.5-VL) for CPU tests and offline demos.

They are built from configs with the real transformers classes and saved with `save_pretrained`, model
and processor side by side, in the same layout as the hub repos they stand in for:
    <root>/tiny-llava/   like llava-hf/llava-1.5-13b-hf  (LlavaForConditionalGeneration + LlavaProcessor)
    <root>/tiny-qwen/    like Qwen/Qwen2.5-VL-7B-Instruct (Qwen2_5_VLForConditionalGeneration + processor)

`MLLMCritic.load` then reads them with the very same `from_pretrained` calls as the real ids.

Both language models are 64 wide (the tiny aligners are built with guidance_dim 64). Weights are seeded:
the same seed always gives the same files. Tokenizers are built in memory: a character-level Llama
tokenizer (byte fallback, plus `<image>` and `<pad>`) and a byte-level Qwen2 tokenizer without merges.

Random weights produce gibberish. So that a greedy critique is still readable text, each tiny model's
`generation_config.json` suppresses every token that does not decode to one printable ASCII character
(control bytes, special tokens other than end-of-sequence); a generated token is then at most one
character of text. This is a property of the tiny test models only; real models keep their own
generation config.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from img_core.mllm import LLAVA_IMAGE_TOKEN
from img_core.weights.convert_llava import add_image_and_pad_tokens

TINY_LLAVA_NAME = "tiny-llava"
TINY_QWEN_NAME = "tiny-qwen"
TINY_TEXT_HIDDEN = 64  # Dg of the tiny MLLMs; the tiny aligners use guidance_dim 64
TINY_CONTEXT_TOKENS = 1024  # max_position_embeddings of both tiny language models

# Tiny LLaVA vision tower: 32 px CLIP with 8 px patches -> 16 patches (+ CLS, dropped by "default").
TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH_SIZE = 8

# Tiny Qwen vision: 14 px patches merged 2x2 -> one token per 28x28 pixels, 4 to 16 tokens per image.
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
QWEN_MIN_PIXELS = (28 * 2) ** 2
QWEN_MAX_PIXELS = (28 * 4) ** 2

LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The same layout as Qwen2.5-VL-Instruct's chat template (default system message, <|im_start|>role\n
# ... <|im_end|>, image as <|vision_start|><|image_pad|><|vision_end|>), written for the tiny model.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _printable_characters() -> list[str]:
    """Printable ASCII without the space (the space is a separate token in both tokenizers)."""
    return [char for char in string.printable if char.isprintable() and char != " "]


def build_tiny_llama_tokenizer():
    """A Llama tokenizer (Metaspace + byte-fallback BPE, like LLaVA-1.5's) with a character vocabulary:
    `<unk> <s> </s>`, the 256 byte-fallback tokens, `▁` and printable ASCII. No `<image>` or pad token:
    those are added by `convert_llava.add_image_and_pad_tokens`."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {token: index for index, token in enumerate(LLAMA_SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["▁", *_printable_characters()]:
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False)
    tokenizer.model_max_length = TINY_CONTEXT_TOKENS
    return tokenizer


def tiny_llama_config(vocab_size: int, pad_token_id: int | None = None):
    """Config of the tiny Llama language model (64 wide, 2 layers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TINY_CONTEXT_TOKENS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )


def tiny_clip_vision_config():
    """Config of the tiny CLIP vision tower (32 px, 8 px patches, 32 wide, 2 layers)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=TINY_CLIP_PATCH_SIZE,
        projection_dim=32,
    )


def tiny_clip_image_processor():
    """CLIP preprocessing at the tiny tower's resolution (resize shortest edge, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )


def _unprintable_token_ids(tokenizer, keep: set[int]) -> list[int]:
    """Ids of every token, except those in `keep`, that does not decode to one printable ASCII character."""
    allowed = set(_printable_characters()) | {" "}
    return [
        token_id
        for token_id in range(len(tokenizer))
        if token_id not in keep and tokenizer.decode([token_id], skip_special_tokens=False) not in allowed
    ]


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Build and save a tiny `LlavaForConditionalGeneration` + `LlavaProcessor` into `out_dir`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor


    out_dir = Path(out_dir)
    tokenizer = build_tiny_llama_tokenizer()
    add_image_and_pad_tokens(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(),
        text_config=tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_index=image_token_id,
        image_seq_length=(TINY_CLIP_IMAGE_SIZE // TINY_CLIP_PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = _unprintable_token_ids(tokenizer, keep={tokenizer.eos_token_id})
    processor = LlavaProcessor(
        image_processor=tiny_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=TINY_CLIP_PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, dropped again by "default" selection
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen_tokenizer():
    """A Qwen2 byte-level tokenizer: the 256 byte symbols, no merges, plus Qwen's chat/vision tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    extra = [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS[1:]]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.model_max_length = TINY_CONTEXT_TOKENS
    return tokenizer


def build_tiny_qwen(out_dir: Path, seed: int = 0) -> Path:
    """Build and save a tiny `Qwen2_5_VLForConditionalGeneration` + `Qwen2_5_VLProcessor` into `out_dir`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = TINY_TEXT_HIDDEN // 4
    mrope_section = [2, 3, head_dim // 2 - 5]  # M-RoPE: the rotary half of a head split over (t, h, w)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_CONTEXT_TOKENS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TINY_TEXT_HIDDEN,
            patch_size=QWEN_PATCH_SIZE,
            spatial_merge_size=QWEN_MERGE_SIZE,
            temporal_patch_size=2,
            window_size=2 * QWEN_PATCH_SIZE * QWEN_MERGE_SIZE,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.suppress_tokens = _unprintable_token_ids(tokenizer, keep={ids["<|im_end|>"]})
    pixels = dict(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH_SIZE)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, **pixels),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
