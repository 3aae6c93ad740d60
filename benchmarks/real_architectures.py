"""The real architectures of every preset, as configs written out from the public model cards.

One source for the benchmarks: `bench_core.py` counts their parameters on the meta device and
`bench_gpu.py` builds them with random weights on a GPU (or, shrunk by a `Scale`, on a CPU).

    SDXL base 1.0      UNet 2.57 B, VAE, CLIP ViT-L/14 text + OpenCLIP ViT-bigG/14 text (77 tokens)
    IP-Adapter plus    CLIP ViT-H/14 image encoder (224 px), Resampler (16 tokens x 2048)
    FLUX.1-dev         transformer 11.90 B (19 double + 38 single blocks), VAE (16 latent channels),
                       CLIP ViT-L/14 text (77 tokens) + T5-XXL encoder (512 tokens)
    XLabs IP-Adapter   CLIP ViT-L/14 image encoder (224 px), linear projection to 4 tokens x 4096
    LLaVA-1.5-13B      CLIP ViT-L/14-336 + Llama-2-13B (5120 wide, 40 layers)
    Qwen2.5-VL-7B      its ViT (32 blocks, 1280 wide) + Qwen2.5-7B (3584 wide, 28 layers)

Every builder takes a `Scale`. `Scale(1.0)` is the real model; a smaller factor keeps the head widths
(so RoPE splits, 64-wide quantization blocks and the widths that must agree across models all stay
valid) and shrinks the number of heads, layers and the feed-forward widths, for plumbing runs on a CPU.
Image-encoder input sizes and token counts are never shrunk; vocabularies only for the MLLMs, whose
output layer dominates a small model's CPU time (`Scale.vocabulary`). Models are built in the caller's
default device and dtype (`torch.device(...)` / `torch.set_default_dtype` contexts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_VOCAB = 49408
CLIP_TEXT_TOKENS = 77
T5_VOCAB = 32128
T5_TEXT_TOKENS = 512  # FLUX.1-dev's max_sequence_length
LLAMA_VOCAB = 32064  # LLaVA-1.5 (32000 + <image> + padding to a multiple of 64)
LLAVA_IMAGE_TOKEN_ID = 32000
QWEN_VOCAB = 152064
SDXL_IP_TOKENS = 16
FLUX_IP_TOKENS = 4
SDXL_TIME_EMBED_DIM = 256  # addition_time_embed_dim: 6 time ids x 256 + pooled text = UNet class-embedding input


@dataclass(frozen=True)
class Scale:
    """How much smaller than the real model to build: 1.0 is the real size."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.factor}")

    @property
    def is_real(self) -> bool:
        return self.factor == 1.0

    def count(self, real: int) -> int:
        """Heads, layers, blocks: at least 1."""
        return real if self.is_real else max(1, round(real * self.factor))

    def width(self, real: int, multiple: int = 64) -> int:
        """Feed-forward and projection widths: a multiple of `multiple` (bitsandbytes packs 64-wide blocks)."""
        return real if self.is_real else max(multiple, round(real * self.factor / multiple) * multiple)

    def pixels(self, real: int) -> int:
        """Image side in pixels: a multiple of 64, at least 64."""
        return real if self.is_real else max(64, round(real * self.factor / 64) * 64)

    def steps(self, real: int, minimum: int = 2) -> int:
        """Denoising steps (at least 2: FLUX's true CFG treats the first step apart) or generated tokens."""
        return real if self.is_real else max(minimum, round(real * self.factor))

    def vocabulary(self, real: int, used: int) -> int:
        """The real vocabulary size, or below scale 1 only the `used` ids of a small tokenizer: the output
        layer over the whole vocabulary is a small MLLM's costliest layer on a CPU."""
        return real if self.is_real else used


# ----------------------------------------------------------------------------------------- text encoders


def clip_l_text_config(scale: Scale = Scale(), **token_ids):
    """CLIP ViT-L/14 text tower (SDXL text_encoder, FLUX text_encoder): 768 wide, 12 heads of 64, 12 layers."""
    from transformers import CLIPTextConfig

    heads = scale.count(12)
    return CLIPTextConfig(
        hidden_size=64 * heads, intermediate_size=scale.width(3072), num_attention_heads=heads,
        num_hidden_layers=scale.count(12), vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_TEXT_TOKENS,
        hidden_act="quick_gelu", **token_ids)


def clip_bigg_text_config(scale: Scale = Scale(), **token_ids):
    """OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2): 1280 wide, 32 layers."""
    from transformers import CLIPTextConfig

    heads = scale.count(20)
    return CLIPTextConfig(
        hidden_size=64 * heads, intermediate_size=scale.width(5120), num_attention_heads=heads,
        num_hidden_layers=scale.count(32), vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_TEXT_TOKENS,
        projection_dim=64 * heads, hidden_act="gelu", **token_ids)


def t5_xxl_config(scale: Scale = Scale(), **token_ids):
    """T5 v1.1 XXL encoder (FLUX text_encoder_2): 4096 wide (64 heads of 64), 24 layers, gated GELU."""
    from transformers import T5Config

    heads = scale.count(64)
    return T5Config(
        d_model=64 * heads, d_ff=scale.width(10240), d_kv=64, num_heads=heads, num_layers=scale.count(24),
        vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", **token_ids)


# ---------------------------------------------------------------------------------------- image encoders


def clip_vit_h_config(scale: Scale = Scale()):
    """CLIP ViT-H/14 image encoder of IP-Adapter plus (h94 models/image_encoder): 1280 wide, 16 heads of 80."""
    from transformers import CLIPVisionConfig

    heads = scale.count(16)
    return CLIPVisionConfig(
        hidden_size=80 * heads, intermediate_size=scale.width(5120), num_attention_heads=heads,
        num_hidden_layers=scale.count(32), patch_size=14, image_size=224, projection_dim=scale.width(1024),
        hidden_act="gelu")


def clip_vit_l_config(scale: Scale = Scale(), image_size: int = 224):
    """CLIP ViT-L/14 image encoder (XLabs FLUX IP-Adapter at 224 px; LLaVA-1.5's tower at 336 px)."""
    from transformers import CLIPVisionConfig

    heads = scale.count(16)
    return CLIPVisionConfig(
        hidden_size=64 * heads, intermediate_size=scale.width(4096), num_attention_heads=heads,
        num_hidden_layers=scale.count(24), patch_size=14, image_size=image_size, projection_dim=scale.width(768),
        hidden_act="quick_gelu")


# ---------------------------------------------------------------------------------------------- diffusion


def sdxl_unet(scale: Scale = Scale(), cross_attention_dim: int = 2048, pooled_text_dim: int = 1280):
    """SDXL base UNet: 3 levels of 320/640/1280 channels (5/10/20 heads of 64), 1/2/10 transformer layers.

    `cross_attention_dim` = the two text encoders' widths together (768 + 1280), `pooled_text_dim` =
    text_encoder_2's projection width."""
    from diffusers import UNet2DConditionModel

    heads = tuple(scale.count(h) for h in (5, 10, 20))
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=scale.count(2),
        block_out_channels=tuple(64 * h for h in heads),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(scale.count(n) for n in (1, 2, 10)),
        attention_head_dim=heads,  # diffusers' SDXL config names the head *count* this way
        cross_attention_dim=cross_attention_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_text_dim)


def _vae(scale: Scale, **family_options):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(scale.width(c, multiple=32) for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=scale.count(2), sample_size=1024, force_upcast=True, **family_options)


def sdxl_vae(scale: Scale = Scale()):
    """SDXL's VAE: 4 latent channels, scaling 0.13025, upcast to float32 for decoding (as its config says)."""
    return _vae(scale, latent_channels=4, scaling_factor=0.13025)


def flux_vae(scale: Scale = Scale()):
    """FLUX.1-dev's VAE: 16 latent channels, no quant convs, latents shifted and scaled."""
    return _vae(scale, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159)


def flux_transformer(scale: Scale = Scale(), joint_attention_dim: int = 4096, pooled_projection_dim: int = 768):
    """FLUX.1-dev transformer: 3072 wide (24 heads of 128), 19 double-stream + 38 single-stream blocks.

    `joint_attention_dim` = T5's width, `pooled_projection_dim` = CLIP-L text width."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=scale.count(19), num_single_layers=scale.count(38),
        attention_head_dim=128, num_attention_heads=scale.count(24), joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


# ----------------------------------------------------------------------------------------------- MLLMs


def llava_13b_config(
    scale: Scale = Scale(), image_token_id: int = LLAVA_IMAGE_TOKEN_ID, pad_token_id: int | None = None,
    vocab_size: int = LLAMA_VOCAB,
):
    """LLaVA-1.5-13B: CLIP ViT-L/14 at 336 px (576 image tokens) + Llama-2-13B (40 heads of 128, 40 layers)."""
    from transformers import LlamaConfig, LlavaConfig

    heads = scale.count(40)
    return LlavaConfig(
        vision_config=clip_vit_l_config(scale, image_size=336),
        text_config=LlamaConfig(
            hidden_size=128 * heads, intermediate_size=scale.width(13824), num_attention_heads=heads,
            num_hidden_layers=scale.count(40), vocab_size=vocab_size, max_position_embeddings=4096,
            pad_token_id=pad_token_id),
        image_token_id=image_token_id)


def qwen25_vl_7b_config(
    scale: Scale = Scale(), vocab_size: int = QWEN_VOCAB, text_token_ids: dict | None = None, **token_ids
):
    """Qwen2.5-VL-7B: its ViT (32 blocks of 16 heads of 80, window attention except 4 full blocks) + Qwen2.5-7B
    (28 heads of 128 with 4 KV heads, 28 layers). `text_token_ids`: bos/eos/pad of the language model;
    `token_ids`: image/video/vision start/end token ids."""
    from transformers import Qwen2_5_VLConfig

    heads = scale.count(28)
    kv_heads = scale.count(4)
    heads = max(kv_heads, heads // kv_heads * kv_heads)  # whole query groups per KV head
    depth = scale.count(32)
    full_attention_blocks = sorted({min(depth - 1, int(index * scale.factor)) for index in (7, 15, 23, 31)})
    return Qwen2_5_VLConfig(
        text_config={"hidden_size": 128 * heads, "intermediate_size": scale.width(18944),
                     "num_attention_heads": heads, "num_hidden_layers": scale.count(28),
                     "num_key_value_heads": kv_heads, "vocab_size": vocab_size, "max_position_embeddings": 128000,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                     **(text_token_ids or {})},
        vision_config={"depth": depth, "hidden_size": 80 * scale.count(16),
                       "intermediate_size": scale.width(3420),
                       "num_heads": scale.count(16), "out_hidden_size": 128 * heads,
                       "fullatt_block_indexes": full_attention_blocks, "window_size": 112},
        **token_ids)


def parameter_count(build) -> int:
    """Parameters of the model `build()` returns, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())
