"""Tiny random-weight diffusion stacks (SDXL + IP-Adapter plus, FLUX + XLabs IP-Adapter) for CPU.

They are built from configs with the real diffusers/transformers classes, saved in the same folder
layout as the hub repos they stand in for, and then loaded by the backends with the very same
`from_pretrained` / `load_ip_adapter` calls as the real presets:

    <root>/tiny-sdxl/                  like stabilityai/stable-diffusion-xl-base-1.0 (model_index.json, unet/, ...)
    <root>/tiny-ip-adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors   like h94/IP-Adapter
    <root>/tiny-ip-adapter/models/image_encoder/                                  like h94/IP-Adapter
    <root>/tiny-flux/                  like black-forest-labs/FLUX.1-dev
    <root>/tiny-flux-ip-adapter/ip_adapter.safetensors                           like XLabs-AI/flux-ip-adapter
    <root>/tiny-clip-vit/              like openai/clip-vit-large-patch14

Weights are seeded, so the same seed always gives the same files. Images are 64x64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_IMAGE_SIZE = 64
SDXL_CROSS_ATTENTION_DIM = 64  # width of the tiny SDXL IP-Adapter tokens (real: 2048)
FLUX_JOINT_ATTENTION_DIM = 32  # width of the tiny FLUX IP-Adapter tokens (real: 4096)
SDXL_IP_TOKENS = 16
FLUX_IP_TOKENS = 4

# Words that get whole-word BPE merges, so tiny prompts tokenize into about as many tokens as real ones.
_COMMON_WORDS = (
    "a an the and of in on with under over wearing playing holding next to near is are green brown red blue "
    "yellow white black orange purple pink banana horse robot penguin top hat vintage trumpet rainbow photo "
    "photograph wall along city street watercolor mural foxes jazz band cat dog man woman child car house tree "
    "sky sun moon river mountain table chair cup book flower bird fish boat beach forest snow night day small "
    "big large tiny old young two three four five painting drawing style sitting standing running flying"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for raw bytes (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    alphabet = {}
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]


def build_clip_tokenizer(model_max_length: int = 77):
    """A CLIP byte-level BPE tokenizer with a small vocabulary, built in memory.

    Its merges are learned (tokenizers' BpeTrainer, CLIP's `</w>` end-of-word suffix) on a list of common
    prompt words, so those words become single tokens as in the real CLIP vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>", "!"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=special, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(_COMMON_WORDS)], trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {token: index for index, token in enumerate(special)}
    for char in _byte_alphabet():  # every byte, inside and at the end of a word
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in learned["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram) tokenizer with a small vocabulary, built in memory."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -6.0) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [(c, -6.0) for c in "0123456789.,!?'-"]
    pieces += [("▁" + word, -3.0) for word in _COMMON_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(hidden_size: int, projection_dim: int, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_clip_vision(seed: int, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        projection_dim=projection_dim,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModelWithProjection(config).eval()


def _tiny_vae(seed: int, **family_options):
    """A 2-level AutoencoderKL: 64x64 images <-> 4x32x32 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
        **family_options,
    )


def _random_like(shape: tuple[int, ...], generator: torch.Generator, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


def build_tiny_sdxl(root: Path, seed: int = 0) -> None:
    """Write `<root>/tiny-sdxl`, `<root>/tiny-ip-adapter` (plus, SDXL) and `<root>/tiny-sdxl-dpo-unet`."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def tiny_unet(unet_seed: int) -> UNet2DConditionModel:
        torch.manual_seed(unet_seed)
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=TINY_IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
            cross_attention_dim=SDXL_CROSS_ATTENTION_DIM,  # concat of the two text encoders (32 + 32)
            norm_num_groups=8,
        )

    unet = tiny_unet(seed)
    vae = _tiny_vae(seed + 1)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(32, 32, tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, 32, tokenizer))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    pipeline.save_pretrained(root / "tiny-sdxl")
    # SDXL-DPO swaps in another UNet of the same shape (mhdang/dpo-sdxl-text2image-v1 has unet/ only).
    tiny_unet(seed + 100).save_pretrained(root / "tiny-sdxl-dpo-unet" / "unet")

    # IP-Adapter plus (original h94 layout): image_proj = Resampler over CLIP hidden_states[-2],
    # ip_adapter = to_k_ip / to_v_ip for every cross-attention layer, numbered 1, 3, 5, ...
    image_encoder = _tiny_clip_vision(seed + 4)
    image_encoder.save_pretrained(root / "tiny-ip-adapter" / "models" / "image_encoder")
    generator = torch.Generator().manual_seed(seed + 5)
    embed_dim = image_encoder.config.hidden_size
    hidden_dim, heads, dim_head, depth = 32, 1, 64, 4  # diffusers reads heads as to_q rows // 64, depth 4
    inner = heads * dim_head
    image_proj = {
        "latents": _random_like((1, SDXL_IP_TOKENS, hidden_dim), generator, 1 / hidden_dim**0.5),
        "proj_in.weight": _random_like((hidden_dim, embed_dim), generator),
        "proj_in.bias": torch.zeros(hidden_dim),
        "proj_out.weight": _random_like((SDXL_CROSS_ATTENTION_DIM, hidden_dim), generator),
        "proj_out.bias": torch.zeros(SDXL_CROSS_ATTENTION_DIM),
        "norm_out.weight": torch.ones(SDXL_CROSS_ATTENTION_DIM),
        "norm_out.bias": torch.zeros(SDXL_CROSS_ATTENTION_DIM),
    }
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            image_proj[f"layers.{i}.0.{norm}.weight"] = torch.ones(hidden_dim)
            image_proj[f"layers.{i}.0.{norm}.bias"] = torch.zeros(hidden_dim)
        image_proj[f"layers.{i}.0.to_q.weight"] = _random_like((inner, hidden_dim), generator)
        image_proj[f"layers.{i}.0.to_kv.weight"] = _random_like((2 * inner, hidden_dim), generator)
        image_proj[f"layers.{i}.0.to_out.weight"] = _random_like((hidden_dim, inner), generator)
        image_proj[f"layers.{i}.1.0.weight"] = torch.ones(hidden_dim)
        image_proj[f"layers.{i}.1.0.bias"] = torch.zeros(hidden_dim)
        image_proj[f"layers.{i}.1.1.weight"] = _random_like((4 * hidden_dim, hidden_dim), generator)
        image_proj[f"layers.{i}.1.3.weight"] = _random_like((hidden_dim, 4 * hidden_dim), generator)
    ip_layers = {}
    key_id = 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
        ip_layers[f"{key_id}.to_k_ip.weight"] = _random_like(tuple(to_k.shape), generator, 0.5)
        ip_layers[f"{key_id}.to_v_ip.weight"] = _random_like(tuple(to_k.shape), generator, 0.5)
        key_id += 2
    weights = {f"image_proj.{k}": v for k, v in image_proj.items()}
    weights.update({f"ip_adapter.{k}": v for k, v in ip_layers.items()})
    weights_dir = root / "tiny-ip-adapter" / "sdxl_models"
    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(weights_dir / "ip-adapter-plus_sdxl_vit-h.safetensors"))


def build_tiny_flux(root: Path, seed: int = 0) -> None:
    """Write `<root>/tiny-flux`, `<root>/tiny-flux-ip-adapter` (XLabs layout) and `<root>/tiny-clip-vit`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    num_double_blocks = 2
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=num_double_blocks,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_ATTENTION_DIM,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    # FLUX's VAE has no quant convs and shifts/scales its latents (values of FLUX.1-dev's vae config).
    vae = _tiny_vae(seed + 1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    clip_tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(32, 32, clip_tokenizer))
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=FLUX_JOINT_ATTENTION_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipeline.save_pretrained(root / "tiny-flux")

    # XLabs IP-Adapter: a linear projection of CLIP image_embeds to 4 tokens, plus k/v per double block.
    image_encoder = _tiny_clip_vision(seed + 4)
    image_encoder.save_pretrained(root / "tiny-clip-vit")
    generator = torch.Generator().manual_seed(seed + 5)
    clip_dim = image_encoder.config.projection_dim
    weights = {
        "ip_adapter_proj_model.proj.weight": _random_like(
            (FLUX_IP_TOKENS * FLUX_JOINT_ATTENTION_DIM, clip_dim), generator, 0.5
        ),
        "ip_adapter_proj_model.proj.bias": torch.zeros(FLUX_IP_TOKENS * FLUX_JOINT_ATTENTION_DIM),
        "ip_adapter_proj_model.norm.weight": torch.ones(FLUX_JOINT_ATTENTION_DIM),
        "ip_adapter_proj_model.norm.bias": torch.zeros(FLUX_JOINT_ATTENTION_DIM),
    }
    inner_dim = transformer.inner_dim
    for block in range(num_double_blocks):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj"
            weights[f"{prefix}.weight"] = _random_like((inner_dim, FLUX_JOINT_ATTENTION_DIM), generator, 0.5)
            weights[f"{prefix}.bias"] = _random_like((inner_dim,), generator, 0.1)
    (root / "tiny-flux-ip-adapter").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(root / "tiny-flux-ip-adapter" / "ip_adapter.safetensors"))
