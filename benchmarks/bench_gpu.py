"""Measured seconds and GPU memory of every README memory-table row, with no downloads.

    HF_HUB_OFFLINE=1 python benchmarks/bench_gpu.py [--device cuda] [--rows 'sdxl/*'] [--scale 1] [--offload]
                                                    [--out FILE]
    make bench-gpu
    python benchmarks/bench_gpu.py --device cpu --scale 0.05   # plumbing run: all rows in ~50 s of CPU time

For each row of README "Memory (estimate) against a 24 GB GPU" (preset x diffusion quantization x MLLM x
MLLM quantization, `README_ROWS`):
  1. build the preset's real architectures (configs in `real_architectures.py`) with random weights,
     directly on the device in the dtype the session would use;
  2. apply the row's quantization (below);
  3. wrap them in img_core's own classes: the preset's backend class (`SDXLBackend` / `FluxBackend`) around
     the pipeline, an `MLLMCritic` around the MLLM, a fresh `ImplicitAligner`, all set on an `IMGSession`;
  4. `session.generate` (round 0) and `session.refine` (one IMG round: critique, guidance, image features,
     alignment, re-generation) at the preset's resolution and steps;
  5. record seconds per stage and `torch.cuda.max_memory_allocated` / `max_memory_reserved`, reset per row
     (once for building, once for the two rounds).
The results go to benchmarks/results/gpu-<device name>.json (see benchmarks/results/README.md) and a table
is printed. The file is written after every row, and rows already in it (same device, scale, offload
mode) are kept: `--rows 'sdxl/*'` and then `--rows 'flux-dev/*'` fill one file. Everything stays resident
on the GPU (the README's "all resident" column); `--offload` measures the "with `--offload`" column.

Quantization of random weights, in memory (nothing is written to disk; the real checkpoints are 10-30 GB):
  * MLLM, and transformers components of the pipeline (FLUX's T5): transformers' own loader with the
    very config img_core uses - `from_pretrained(None, config=..., state_dict=<random weights>,
    quantization_config=...)` - so bitsandbytes/quanto layers are installed exactly as for a checkpoint.
    The MLLM's config is `img_core.mllm.quantization_config`, the T5's comes from
    `img_core.backends.base.pipeline_quantization_config`.
  * diffusers models (SDXL UNet, FLUX transformer): diffusers' bitsandbytes loader reads checkpoints only
    (and refuses CPUs), so every `nn.Linear` is swapped for the bitsandbytes layer diffusers' loader
    installs (`Linear4bit` nf4 / `Linear8bitLt`, settings from `pipeline_quantization_config`), holding
    the random weights; moving the layer to the device quantizes it. As in a real load, the IP-Adapter
    layers are added after quantization and stay in the pipeline's dtype.
README's "int8" rows run bitsandbytes 8-bit (`bnb-8bit`).

Random weights make noise images, and the tiny in-memory tokenizers (real maximum lengths) say nothing
about the text. Each critique is made to run to `max_critique_tokens` (end-of-text and stop strings are
suppressed): the longest, slowest case. There is no warm-up: the first row also pays CUDA's one-time
start-up costs. `--scale` below 1 shrinks heads, layers, widths, resolution and steps
(`real_architectures.Scale`): figures at a reduced scale are plumbing checks, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import functools
import gc
import json
import platform
import re
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_architectures

import real_architectures as real  # noqa: E402
from real_architectures import Scale  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_FORMAT = "img-bench-gpu/1"
GIB = 1024**3
PROMPT = "A photo of a robot wearing a top hat and playing a vintage trumpet under a rainbow"
SEED = 0
CPU_SCALE_HINT = 0.05  # what the CPU test and the docs use
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: 14 px patches merged 2x2, 3136 to 12845056 pixels.
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056


@dataclass(frozen=True)
class Row:
    """One row of the README memory table."""

    preset: str
    diffusion_quantization: str  # img_core DIFFUSION_QUANTIZATIONS ("none" = the preset's fp16/bf16)
    mllm: str  # a key of img_core.mllm.KNOWN_MLLMS
    mllm_quantization: str  # img_core.mllm QUANTIZATIONS

    @property
    def name(self) -> str:
        return f"{self.preset}/{self.diffusion_quantization}/{self.mllm}/{self.mllm_quantization}"


# README "### Memory (estimate) against a 24 GB GPU", top to bottom.
README_ROWS = (
    Row("sdxl", "none", "img-llava-13b", "none"),
    Row("sdxl", "none", "img-llava-13b", "bnb-8bit"),
    Row("sdxl", "none", "img-llava-13b", "bnb-nf4"),
    Row("sdxl", "none", "qwen2.5-vl-7b", "bnb-nf4"),
    Row("flux-dev", "none", "img-llava-13b", "bnb-nf4"),
    Row("flux-dev", "bnb-nf4", "img-llava-13b", "bnb-nf4"),
    Row("flux-dev", "bnb-nf4", "qwen2.5-vl-7b", "bnb-nf4"),
)


# ------------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New modules get their (random) weights directly on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def with_transformers_quantization(model, quantization_config, device: torch.device, dtype: torch.dtype):
    """`model` reloaded through transformers' `from_pretrained` from its own random weights, quantized."""
    if quantization_config is None:
        return model
    state_dict = model.state_dict()
    quantized = type(model).from_pretrained(
        None, config=model.config, state_dict=state_dict, quantization_config=quantization_config, dtype=dtype,
        device_map={"": str(device)},
    )
    del state_dict
    return quantized.eval()


def quantize_linear_layers(model: nn.Module, config, device: torch.device) -> nn.Module:
    """Swap every `nn.Linear` of a diffusers model for the bitsandbytes layer diffusers' loader installs for
    `config` (a diffusers `BitsAndBytesConfig`), holding the layer's own weights; `.to(device)` quantizes."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            has_bias = child.bias is not None
            if config.load_in_4bit:
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=has_bias, compute_dtype=config.bnb_4bit_compute_dtype,
                    compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
                    quant_storage=config.bnb_4bit_quant_storage, device="meta",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
                    quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage, module=layer,
                )
            else:  # Int8Params quantizes when moved off the CPU, so its weights start there
                layer = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=has_bias,
                    has_fp16_weights=config.llm_int8_has_fp16_weight, threshold=config.llm_int8_threshold,
                    device="meta",
                )
                layer.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if has_bias:
                layer.bias = child.bias
            setattr(parent, name, layer.to(device))
    return model


def quantize_pipeline_components(pipeline, quantization: str, components: tuple[str, ...], device, dtype) -> None:
    """Apply the preset's diffusion-side quantization to `components` of `pipeline`, in memory."""
    from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from diffusers import ModelMixin
    from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

    from img_core.backends.base import pipeline_quantization_config

    # img_core hands this config out for CUDA only, because diffusers' checkpoint loader refuses CPUs; the
    # bitsandbytes layers used here run on CPUs too, so a CPU plumbing run asks for the same (CUDA) settings.
    config = pipeline_quantization_config(quantization, components, torch.device("cuda"), dtype)
    if config is None:
        return
    for component in config.components_to_quantize:
        module = getattr(pipeline, component)
        if isinstance(module, ModelMixin):
            quantize_linear_layers(module, DiffusersBitsAndBytesConfig(**config.quant_kwargs), device)
        else:
            module = with_transformers_quantization(
                module, TransformersBitsAndBytesConfig(**config.quant_kwargs), device, dtype
            )
            pipeline.register_modules(**{component: module})


def _random(shape: tuple[int, ...], device, dtype, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype) * std


def sdxl_plus_ip_adapter_weights(unet, image_encoder, scale: Scale, device, dtype) -> dict:
    """Random IP-Adapter plus (ViT-H) weights in h94's layout: a Resampler (1280 wide, 20 heads of 64, depth 4,
    16 queries) over the image encoder's hidden states, and to_k_ip / to_v_ip for every cross-attention."""
    embed_dim = image_encoder.config.hidden_size
    hidden = 64 * scale.count(20)  # diffusers reads the head count as to_q rows // 64
    output_dim = unet.config.cross_attention_dim
    ones = functools.partial(torch.ones, device=device, dtype=dtype)
    zeros = functools.partial(torch.zeros, device=device, dtype=dtype)
    image_proj = {
        "latents": _random((1, real.SDXL_IP_TOKENS, hidden), device, dtype),
        "proj_in.weight": _random((hidden, embed_dim), device, dtype), "proj_in.bias": zeros(hidden),
        "proj_out.weight": _random((output_dim, hidden), device, dtype), "proj_out.bias": zeros(output_dim),
        "norm_out.weight": ones(output_dim), "norm_out.bias": zeros(output_dim),
    }
    for i in range(4):
        for norm in ("norm1", "norm2"):
            image_proj[f"layers.{i}.0.{norm}.weight"] = ones(hidden)
            image_proj[f"layers.{i}.0.{norm}.bias"] = zeros(hidden)
        image_proj[f"layers.{i}.0.to_q.weight"] = _random((hidden, hidden), device, dtype)
        image_proj[f"layers.{i}.0.to_kv.weight"] = _random((2 * hidden, hidden), device, dtype)
        image_proj[f"layers.{i}.0.to_out.weight"] = _random((hidden, hidden), device, dtype)
        image_proj[f"layers.{i}.1.0.weight"], image_proj[f"layers.{i}.1.0.bias"] = ones(hidden), zeros(hidden)
        image_proj[f"layers.{i}.1.1.weight"] = _random((4 * hidden, hidden), device, dtype)
        image_proj[f"layers.{i}.1.3.weight"] = _random((hidden, 4 * hidden), device, dtype)
    ip_adapter = {}
    key_id = 1  # h94 numbers the attention layers 0, 1, 2, ...: cross-attentions are the odd ones
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name.removesuffix(".processor")).to_k
            shape = (to_k.out_features, to_k.in_features)  # not weight.shape: quantized weights are packed
            for kind in ("k", "v"):
                ip_adapter[f"{key_id}.to_{kind}_ip.weight"] = _random(shape, device, dtype)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def flux_xlabs_ip_adapter_weights(transformer, image_encoder, device, dtype) -> dict:
    """Random XLabs FLUX IP-Adapter weights, in the layout diffusers converts them to: a linear projection of
    the CLIP image embedding to 4 tokens, and k/v projections for every double-stream block."""
    joint_dim = transformer.config.joint_attention_dim
    clip_dim = image_encoder.config.projection_dim
    image_proj = {
        "proj.weight": _random((real.FLUX_IP_TOKENS * joint_dim, clip_dim), device, dtype),
        "proj.bias": torch.zeros(real.FLUX_IP_TOKENS * joint_dim, device=device, dtype=dtype),
        "norm.weight": torch.ones(joint_dim, device=device, dtype=dtype),
        "norm.bias": torch.zeros(joint_dim, device=device, dtype=dtype),
    }
    ip_adapter = {}
    for block in range(transformer.config.num_layers):
        for kind in ("k", "v"):
            ip_adapter[f"{block}.to_{kind}_ip.weight"] = _random((transformer.inner_dim, joint_dim), device, dtype)
            ip_adapter[f"{block}.to_{kind}_ip.bias"] = torch.zeros(transformer.inner_dim, device=device, dtype=dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def sdxl_components(scale: Scale, device: torch.device, dtype: torch.dtype) -> dict:
    """SDXL base 1.0's models (random weights), tokenizers and IP-Adapter plus image encoder (CLIP ViT-H)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    from img_core.tiny.diffusion import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(real.CLIP_TEXT_TOKENS)
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    with building_on(device, dtype):
        text_encoder = CLIPTextModel(real.clip_l_text_config(scale, **token_ids)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(real.clip_bigg_text_config(scale, **token_ids)).eval()
        unet = real.sdxl_unet(
            scale, cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            pooled_text_dim=text_encoder_2.config.projection_dim,
        ).eval()
        vae = real.sdxl_vae(scale).eval()
        image_encoder = CLIPVisionModelWithProjection(real.clip_vit_h_config(scale)).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=unet, image_encoder=image_encoder, feature_extractor=feature_extractor)


def build_sdxl_pipeline(scale: Scale, quantization: str, components: tuple[str, ...], device, dtype):
    """SDXL + IP-Adapter plus (ViT-H), random weights, as `SDXLBackend.load` would leave it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(  # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipeline = StableDiffusionXLPipeline(scheduler=scheduler, **sdxl_components(scale, device, dtype))
    quantize_pipeline_components(pipeline, quantization, components, device, dtype)
    weights = sdxl_plus_ip_adapter_weights(pipeline.unet, pipeline.image_encoder, scale, device, dtype)
    pipeline.load_ip_adapter(weights, subfolder="", weight_name="", image_encoder_folder=None)
    return pipeline


def flux_components(scale: Scale, device: torch.device, dtype: torch.dtype) -> dict:
    """FLUX.1-dev's models (random weights), tokenizers and the XLabs IP-Adapter's CLIP ViT-L/14 image encoder."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPVisionModelWithProjection,
        T5EncoderModel,
    )

    from img_core.tiny.diffusion import build_clip_tokenizer, build_t5_tokenizer

    clip_tokenizer = build_clip_tokenizer(real.CLIP_TEXT_TOKENS)
    t5_tokenizer = build_t5_tokenizer(real.T5_TEXT_TOKENS)
    with building_on(device, dtype):
        text_encoder = CLIPTextModel(real.clip_l_text_config(
            scale, bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id)).eval()
        text_encoder_2 = T5EncoderModel(real.t5_xxl_config(
            scale, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id)).eval()
        transformer = real.flux_transformer(
            scale, joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
        ).eval()
        vae = real.flux_vae(scale).eval()
        image_encoder = CLIPVisionModelWithProjection(real.clip_vit_l_config(scale)).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=t5_tokenizer, transformer=transformer, image_encoder=image_encoder,
                feature_extractor=feature_extractor)


def build_flux_pipeline(scale: Scale, quantization: str, components: tuple[str, ...], device, dtype):
    """FLUX.1-dev + XLabs IP-Adapter, random weights, as `FluxBackend.load` would leave it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(  # black-forest-labs/FLUX.1-dev scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    pipeline = FluxPipeline(scheduler=scheduler, **flux_components(scale, device, dtype))
    quantize_pipeline_components(pipeline, quantization, components, device, dtype)
    weights = flux_xlabs_ip_adapter_weights(pipeline.transformer, pipeline.image_encoder, device, dtype)
    pipeline.load_ip_adapter(weights, weight_name="", image_encoder_pretrained_model_name_or_path=None)
    return pipeline


def _suppressed_token_ids(tokenizer, vocab_size: int, stop_string: str | None) -> list[int]:
    """Token ids a random-weight critique must not produce, so that it runs to its token limit as printable
    text: special tokens (end of text, image tokens), tokens that decode to nothing printable (byte
    fallbacks), pieces of the chat template's stop string, and ids past the small tokenizer's vocabulary
    (at scale 1 the output layer spans the real vocabulary)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)

    def unwanted(token_id: int) -> bool:
        text = tokenizer.decode([token_id]).strip()
        printable = text.isprintable() and "\ufffd" not in text  # a lone byte of a UTF-8 sequence decodes to U+FFFD
        return not text or not printable or bool(stop_string and text in stop_string)

    unwanted_ids = {token_id for token_id in range(len(tokenizer)) if unwanted(token_id)}
    return sorted(special | unwanted_ids | set(range(len(tokenizer), vocab_size)))


def build_llava(scale: Scale, device, dtype):
    """LLaVA-1.5-13B (random weights) and a LlavaProcessor with a small Llama tokenizer (`<image>`, `<pad>`)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from img_core.mllm import LLAVA_IMAGE_TOKEN
    from img_core.tiny.mllm import build_tiny_llama_tokenizer
    from img_core.weights.convert_llava import add_image_and_pad_tokens

    tokenizer = build_tiny_llama_tokenizer()
    add_image_and_pad_tokens(tokenizer)
    config = real.llava_13b_config(
        scale, image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN), pad_token_id=tokenizer.pad_token_id,
        vocab_size=scale.vocabulary(real.LLAMA_VOCAB, len(tokenizer)),
    )
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    with building_on(device, dtype):
        model = LlavaForConditionalGeneration(config).eval()
    size = config.vision_config.image_size  # 336
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN, num_additional_image_tokens=1,  # the CLS token, dropped by "default"
    )
    return model, processor


def build_qwen(scale: Scale, device, dtype):
    """Qwen2.5-VL-7B (random weights) and its processor with a small byte-level Qwen2 tokenizer."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from img_core.tiny.mllm import (
        QWEN_CHAT_TEMPLATE,
        QWEN_SPECIAL_TOKENS,
        build_tiny_qwen_tokenizer,
    )

    tokenizer = build_tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = real.qwen25_vl_7b_config(
        scale, vocab_size=scale.vocabulary(real.QWEN_VOCAB, len(tokenizer)),
        text_token_ids={"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                        "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    with building_on(device, dtype):
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    pixels = dict(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=14, merge_size=2,
                  temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


def build_critic(mllm_name: str, quantization: str, scale: Scale, device: torch.device):
    """An `MLLMCritic` around the real MLLM architecture with random weights, quantized as `MLLMCritic.load` does."""
    from img_core.mllm import (
        KNOWN_MLLMS,
        STOP_STRINGS,
        MLLMCritic,
        default_dtype,
        quantization_config,
    )

    spec = KNOWN_MLLMS[mllm_name]
    # As MLLMCritic.load picks it: bitsandbytes' int8 matmul works in float16.
    dtype = torch.float16 if quantization == "bnb-8bit" else default_dtype(device)
    builders = {"llava": build_llava, "qwen2_5_vl": build_qwen}
    model, processor = builders[spec.family](scale, device, dtype)
    model = with_transformers_quantization(model, quantization_config(quantization, spec.family, dtype), device, dtype)
    text_config = model.config.text_config
    model.generation_config.suppress_tokens = _suppressed_token_ids(
        processor.tokenizer, text_config.vocab_size, STOP_STRINGS.get(spec.chat_template)
    )
    spec = dataclasses.replace(spec, hidden_size=text_config.hidden_size)  # scaled runs are narrower
    return MLLMCritic(spec, model, processor, quantization, str(device), dtype)


def build_backend(preset, quantization: str, scale: Scale, device: torch.device, dtype: torch.dtype):
    """The preset's img_core backend class around a random-weight pipeline (no `load`: nothing to download)."""
    from img_core.backends import backend_class

    builders = {"sdxl": build_sdxl_pipeline, "flux": build_flux_pipeline}
    pipeline = builders[preset.family](scale, quantization, preset.quantize_components, device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    return backend_class(preset.family)(pipeline, preset, device, dtype)


def build_aligner(backend, critic, scale: Scale, device: torch.device):
    """A fresh Implicit Aligner for this backend's image tokens and this MLLM's guidance, float32 as released."""
    from img_core.aligner import AlignerConfig, ImplicitAligner

    config = AlignerConfig(
        image_dim=backend.feature_dim, guidance_dim=critic.hidden_size, heads=scale.count(20),
        num_image_tokens=backend.num_image_tokens, image_feature_kind=backend.feature_kind, mllm=critic.spec.name,
    )
    with building_on(device, torch.float32):
        return ImplicitAligner(config).eval()


# ---------------------------------------------------------------------------------------------- measuring


def module_gib(module: nn.Module) -> float:
    """GiB held by a module's weights and buffers, quantized tensors counted by what they store."""
    from img_core.mllm import tensor_bytes

    tensors = {id(t): t for t in module.parameters()}
    tensors.update({id(t): t for t in module.buffers()})
    return sum(tensor_bytes(t) for t in tensors.values()) / GIB


def pipeline_gib(pipeline) -> float:
    return sum(module_gib(c) for c in pipeline.components.values() if isinstance(c, nn.Module))


def reset_peak_memory(device: torch.device) -> None:
    """Free what earlier rows left behind and start counting peaks afresh (CUDA only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def quantized_layer_count(module: nn.Module) -> int:
    """Layers whose weights bitsandbytes or optimum-quanto hold: shows that a quantization was applied."""
    return sum(type(m).__module__.startswith(("bitsandbytes", "optimum.quanto")) for m in module.modules())


def peak_memory(device: torch.device) -> dict[str, float] | None:
    """Peak allocated / reserved GiB since the last reset, and what is allocated now; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return {
        "allocated_now": torch.cuda.memory_allocated(device) / GIB,
        "peak_allocated": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved": torch.cuda.max_memory_reserved(device) / GIB,
    }


@contextlib.contextmanager
def timed(name: str, seconds: dict[str, float], device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start


def benchmark_preset(name: str, scale: Scale):
    """The preset with its resolution and steps shrunk by `scale` (unchanged at scale 1), and its aligner
    marked as a fresh one (no official checkpoint file): like a `save_pretrained` aligner it takes the
    IP-Adapter projection's tokens, so no release `resampler.pth` is looked up on the hub."""
    from img_core.presets import get_preset

    preset = get_preset(name)
    return dataclasses.replace(
        preset, width=scale.pixels(preset.width), height=scale.pixels(preset.height),
        default_steps=scale.steps(preset.default_steps), aligner=dataclasses.replace(preset.aligner, filename=None),
    )


def run_row(row: Row, scale: Scale, device: torch.device, offload: bool = False) -> dict:
    """Build the row's stack, run round 0 and one IMG round, and return what was measured. `offload`: the
    pipeline is built on the GPU, then handed to diffusers' model CPU offload as `--offload` does."""
    from img_core.session import IMGSession, RoundSettings

    torch.manual_seed(SEED)  # the same random weights on every run
    preset = benchmark_preset(row.preset, scale)
    dtype = getattr(torch, preset.dtype) if device.type == "cuda" else torch.float32  # as IMGSession.dtype
    seconds: dict[str, float] = {}
    reset_peak_memory(device)
    with timed("build_diffusion", seconds, device):
        backend = build_backend(preset, row.diffusion_quantization, scale, device, dtype)
        if offload:
            backend.pipeline.enable_model_cpu_offload(device=device)
    with timed("build_mllm", seconds, device):
        critic = build_critic(row.mllm, row.mllm_quantization, scale, device)
    with timed("build_aligner", seconds, device):
        aligner = build_aligner(backend, critic, scale, device)
    session = IMGSession.from_parts(preset, backend, critic, aligner, device)
    build_memory = peak_memory(device)

    reset_peak_memory(device)
    # The preset's defaults (steps already scaled with the preset); a shorter critique below scale 1.
    settings = RoundSettings(max_critique_tokens=scale.steps(RoundSettings().max_critique_tokens, minimum=16))
    first = session.generate(PROMPT, SEED, settings)
    refined = session.refine(first.image, PROMPT, SEED, settings=settings)
    rounds_memory = peak_memory(device)
    for stage, value in [*first.seconds.items(), *refined.seconds.items()]:
        seconds[stage] = seconds.get(stage, 0.0) + value
    return {
        "row": row.name,
        **dataclasses.asdict(row),
        "offload": offload,
        "dtype": {"diffusion": str(session.dtype).removeprefix("torch."),
                  "mllm": str(critic.dtype).removeprefix("torch.")},
        "settings": {"width": preset.width, "height": preset.height, "steps": preset.default_steps,
                     "max_critique_tokens": settings.max_critique_tokens},
        "weights_gib": {"diffusion": pipeline_gib(backend.pipeline), "mllm": module_gib(critic.model),
                        "aligner": module_gib(aligner)},
        "quantized_layers": {"diffusion": sum(quantized_layer_count(c) for c in backend.pipeline.components.values()
                                              if isinstance(c, nn.Module)),
                             "mllm": quantized_layer_count(critic.model)},
        "seconds": seconds,
        "memory_gib": {"build": build_memory, "rounds": rounds_memory},
        "critique_characters": len(refined.critique or ""),
    }


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device, scale: Scale) -> dict:
    import bitsandbytes
    import diffusers
    import transformers

    info = {
        "device": {"type": device.type, "name": platform.processor() or "cpu", "threads": torch.get_num_threads()},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["device"] = {"type": "cuda", "name": properties.name, "total_gib": properties.total_memory / GIB,
                          "capability": f"{properties.major}.{properties.minor}"}
        info["software"]["cuda"] = torch.version.cuda
    return {"format": RESULT_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scale": scale.factor, "prompt": PROMPT, "seed": SEED, **info}


# -------------------------------------------------------------------------------------------------- report

STAGE_COLUMNS = ("build_diffusion", "build_mllm", "generate", "critique", "guidance", "image_features", "align",
                 "regenerate")


def print_table(rows: list[dict]) -> None:
    header = f"{'row':44s} " + " ".join(f"{s[:9]:>9s}" for s in STAGE_COLUMNS) + f" {'peak GiB':>9s} {'reserved':>9s}"
    print(header)
    for result in rows:
        if "error" in result:
            print(f"{result['row']:44s} FAILED: {result['error']}")
            continue
        seconds = result["seconds"]
        stages = " ".join(f"{seconds[s]:9.2f}" if s in seconds else f"{'-':>9s}" for s in STAGE_COLUMNS)
        rounds = result["memory_gib"]["rounds"]
        if rounds:
            memory = f" {rounds['peak_allocated']:9.2f} {rounds['peak_reserved']:9.2f}"
        else:
            memory = f" {'-':>9s} {'-':>9s}"
        print(f"{result['row']:44s} {stages}{memory}")
    print("seconds per stage; peak GiB = torch.cuda.max_memory_allocated / max_memory_reserved over round 0 + 1 round")


def select_rows(patterns: list[str] | None) -> list[Row]:
    if not patterns:
        return list(README_ROWS)
    chosen = [row for row in README_ROWS if any(fnmatch.fnmatchcase(row.name, p) for p in patterns)]
    if not chosen:
        names = "\n  ".join(row.name for row in README_ROWS)
        raise SystemExit(f"--rows {patterns} matches no row; the rows are:\n  {names}")
    return chosen


def merge_rows(previous: list[dict], measured: list[dict]) -> list[dict]:
    """`previous` rows of the same file updated with the rows just `measured`, in README order: runs of
    different `--rows` (each short enough for one GPU session) fill one file together."""
    by_name = {result["row"]: result for result in previous}
    by_name.update({result["row"]: result for result in measured})
    order = {row.name: index for index, row in enumerate(README_ROWS)}
    return sorted(by_name.values(), key=lambda result: order.get(result["row"], len(order)))


def previous_rows(out: Path, report: dict) -> list[dict]:
    """Rows already in `out` when it was written for the same device, scale and offload mode; else none."""
    if not out.is_file():
        return []
    try:
        previous = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"{out} is unreadable ({error}): starting it afresh")
        return []
    same_run = all(previous.get(key) == report[key] for key in ("format", "scale", "offload"))
    same_device = previous.get("device", {}).get("name") == report["device"]["name"]
    if not (same_run and same_device and isinstance(previous.get("rows"), list)):
        print(f"{out} holds another device, scale or offload mode: starting it afresh")
        return []
    return previous["rows"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", action="append", metavar="PATTERN",
                        help="only rows whose name (preset/diffusion-quant/mllm/mllm-quant) matches this shell "
                             "pattern, e.g. 'sdxl/*' (repeatable; default: every README row)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"1 = the real models (needs a GPU); e.g. {CPU_SCALE_HINT} for a CPU plumbing run")
    parser.add_argument("--offload", action="store_true",
                        help="measure with diffusers' model CPU offload (the README's `--offload` column; CUDA only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/gpu-<device name>[-offload][-scale<S>].json); "
                             "rows already in it from the same device, scale and offload mode are kept")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale = Scale(args.scale)
    if device.type == "cpu" and scale.is_real:
        parser.error(f"the real models need a GPU: pass --device cuda, or --scale {CPU_SCALE_HINT} for a CPU run")
    if args.offload and device.type != "cuda":
        parser.error("--offload moves models between the CPU and a GPU: it needs --device cuda")
    rows = select_rows(args.rows)
    suffix = ("-offload" if args.offload else "") + ("" if scale.is_real else f"-scale{scale.factor:g}")
    out = args.out or RESULTS_DIR / f"gpu-{device_slug(device)}{suffix}.json"

    from img_core.logs import quiet_library_output

    quiet_library_output()
    report = {**environment(device, scale), "offload": args.offload, "rows": []}
    kept = previous_rows(out, report)
    out.parent.mkdir(parents=True, exist_ok=True)
    measured: list[dict] = []
    for row in rows:
        print(f"-- {row.name}", flush=True)
        try:
            measured.append(run_row(row, scale, device, offload=args.offload))
        except Exception as error:  # one failing row (out of memory, a library change) must not lose the others
            traceback.print_exc()
            measured.append({"row": row.name, **dataclasses.asdict(row), "error": f"{type(error).__name__}: {error}"})
        finally:
            gc.collect()  # the row's models go before the next row's are built
        report["rows"] = merge_rows(kept, measured)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every row: a cut-off run keeps what it measured
    print_table(measured)
    print(f"wrote {out} ({len(report['rows'])} rows, {len(measured)} measured now)")
    if any("error" in result for result in measured):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
