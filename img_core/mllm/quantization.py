"""Loading an MLLM in less memory: the quantization choices, their transformers configs, and how many bytes
a (possibly quantized) model really holds.

Quantization (`QUANTIZATIONS`) goes through transformers' `BitsAndBytesConfig` / `QuantoConfig`. Only
the language model's linear layers are quantized: the vision tower, the multimodal projector and
`lm_head` stay in `dtype`. They are a small share of the weights, quantizing them costs the most
quality, and bitsandbytes' 4-bit CPU path cannot pack layers narrower than its 64-wide blocks (the tiny
vision towers are 32 wide).

Precision follows memory (`choose_quantization`): the released aligners were trained on guidance from a
bf16 LLaVA, so on a GPU with room the MLLM runs unquantized in bf16; 8-bit, then 4-bit, only when the
GPU is too small for it beside the rest of the preset. The sizes are the README memory table's estimates
(`benchmarks/bench_core.py`); `--quantization` overrides the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from img_core.errors import InvalidInputError
from img_core.presets import Preset
from img_core.settings import MLLM_QUANTIZATIONS as QUANTIZATIONS

# Modules kept unquantized, per family (module names of the transformers v5 classes).
UNQUANTIZED_MODULES = {
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_5_vl": ["model.visual", "lm_head"],
}

# Estimated GPU memory of each real MLLM's weights plus its 1 GiB activation allowance, per quantization
# (GiB; benchmarks/bench_core.py: parameters x bytes per parameter, vision tower and lm_head in bf16).
MLLM_GIB: dict[str, dict[str, float]] = {
    "img-llava-13b": {"none": 25.9, "bnb-8bit": 14.1, "bnb-nf4": 8.9},
    "llava-1.5-13b": {"none": 25.9, "bnb-8bit": 14.1, "bnb-nf4": 8.9},
    "qwen2.5-vl-7b": {"none": 16.4, "bnb-8bit": 10.4, "bnb-nf4": 7.7},
}
# Most precise first: the order in which `choose_quantization` tries them.
PRECISION_ORDER = ("none", "bnb-8bit", "bnb-nf4")
# Kept free beside the estimates (CUDA context, allocator fragmentation).
GPU_HEADROOM_GIB = 1.0


@dataclass(frozen=True)
class PrecisionChoice:
    """The MLLM quantization a session uses and why (logged at load and shown in the app's status)."""

    quantization: str
    reason: str

def default_quantization(device: str | torch.device) -> str:
    """nf4 on CUDA (LLaVA-13B fits in ~8 GB), none elsewhere."""
    return "bnb-nf4" if torch.device(device).type == "cuda" else "none"


def choose_quantization(
    mllm: str,
    device: str | torch.device,
    total_gib: float | None = None,
    free_gib: float | None = None,
    other_gib: float = 0.0,
) -> PrecisionChoice:
    """The most precise quantization of MLLM `mllm` (a `KNOWN_MLLMS` name) that fits the GPU.

    `total_gib` / `free_gib`: the GPU's memory (free measured before anything of the session loads; the
    smaller counts); `other_gib`: what the rest of the preset keeps resident (`preset_other_gib`). On
    CPU: "none" (float32). An MLLM without a size estimate (a local folder, a tiny model) keeps the
    previous default on CUDA, bnb-nf4; so does a GPU of unknown size. When even nf4 does not fit it is
    still nf4 (the session offloads the pipeline then)."""
    if torch.device(device).type != "cuda":
        return PrecisionChoice("none", "on the CPU the MLLM runs unquantized (float32)")
    sizes = MLLM_GIB.get(mllm)
    if sizes is None or total_gib is None:
        unknown = "no size estimate for this MLLM" if sizes is None else "GPU memory unknown"
        return PrecisionChoice("bnb-nf4", f"bnb-nf4 ({unknown})")
    usable = min(total_gib, free_gib) if free_gib is not None else total_gib
    room = usable - other_gib - GPU_HEADROOM_GIB
    for quantization in PRECISION_ORDER:
        if sizes[quantization] <= room:
            shown = "bf16, unquantized" if quantization == "none" else quantization
            return PrecisionChoice(
                quantization,
                f"{shown}: {room:.1f} GiB of the GPU's {usable:.1f} GiB are left for the MLLM, "
                f"it needs about {sizes[quantization]:.1f} GiB",
            )
    return PrecisionChoice(
        "bnb-nf4", f"bnb-nf4, the smallest: only {room:.1f} GiB of the GPU's {usable:.1f} GiB are left for the "
        f"MLLM, it needs about {sizes['bnb-nf4']:.1f} GiB in 4 bits",
    )


def mllm_precision(
    mllm: str, device: str | torch.device, preset: Preset | None = None, requested: str | None = None
) -> PrecisionChoice:
    """What a session loads its MLLM with: `requested` (`--quantization`) when given, else
    `choose_quantization` on the GPU's memory measured now and the preset's estimates."""
    if requested:
        return PrecisionChoice(requested, f"{requested} (given: --quantization, $IMG_QUANTIZATION or ZeroGPU's slice)")
    total, free = measured_gpu_gib(device)
    other = preset_other_gib(preset.mllm, preset.resident_gib) if preset is not None else 0.0
    return choose_quantization(mllm, device, total, free, other)


def preset_other_gib(preset_mllm: str, resident_gib: float) -> float:
    """GPU memory a preset keeps resident besides its MLLM: its memory-table estimate (`Preset.resident_gib`,
    made with the MLLM in nf4) less that MLLM's nf4 share. 0 for presets without an estimate."""
    if resident_gib <= 0 or preset_mllm not in MLLM_GIB:
        return 0.0
    return resident_gib - MLLM_GIB[preset_mllm]["bnb-nf4"]


def measured_gpu_gib(device: str | torch.device) -> tuple[float | None, float | None]:
    """(total, free) GiB of a CUDA device, measured now; (None, None) elsewhere or when CUDA cannot tell
    (on ZeroGPU no GPU is attached outside a GPU call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    try:
        free, total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):
        return None, None
    return total / 1024**3, free / 1024**3


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
