"""Loading an MLLM in less memory: the quantization choices, their transformers configs, and how many bytes
a (possibly quantized) model really holds.

Quantization (`QUANTIZATIONS`) goes through transformers' `BitsAndBytesConfig` / `QuantoConfig`. Only
the language model's linear layers are quantized: the vision tower, the multimodal projector and
`lm_head` stay in `dtype`. They are a small share of the weights, quantizing them costs the most
quality, and bitsandbytes' 4-bit CPU path cannot pack layers narrower than its 64-wide blocks (the tiny
vision towers are 32 wide).
"""

from __future__ import annotations

import torch

from img_core.errors import InvalidInputError
from img_core.settings import MLLM_QUANTIZATIONS as QUANTIZATIONS

# Modules kept unquantized, per family (module names of the transformers v5 classes).
UNQUANTIZED_MODULES = {
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_5_vl": ["model.visual", "lm_head"],
}

def default_quantization(device: str | torch.device) -> str:
    """nf4 on CUDA (LLaVA-13B fits in ~8 GB), none elsewhere."""
    return "bnb-nf4" if torch.device(device).type == "cuda" else "none"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the release runs LLaVA in bf16), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def quantization_config(quantization: str, family: str, compute_dtype: torch.dtype):
    """The transformers quantization config for a `QUANTIZATIONS` name (None for "none")."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    skip = UNQUANTIZED_MODULES[family]
    if quantization == "none":
        return None
    if quantization == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "quanto-int8":
        return QuantoConfig(weights="int8", modules_to_not_convert=skip)
    if quantization == "quanto-int4":
        return QuantoConfig(weights="int4", modules_to_not_convert=skip)
    raise InvalidInputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes really held by a (possibly quantized) tensor.

    Tensor subclasses that wrap inner tensors (optimum-quanto's QTensors: int data + scales) are counted
    through their inner tensors; bitsandbytes parameters add their quantization statistics."""
    if hasattr(tensor, "__tensor_flatten__"):  # a wrapper subclass: count what it wraps
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    total = tensor.numel() * tensor.element_size()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax per block
    while quant_state is not None:
        total += quant_state.absmax.numel() * quant_state.absmax.element_size()
        quant_state = getattr(quant_state, "state2", None)  # nested (double) quantization
    row_scales = getattr(tensor, "SCB", None)  # bitsandbytes 8-bit: one scale per row
    if isinstance(row_scales, torch.Tensor):
        total += row_scales.numel() * row_scales.element_size()
    return total
