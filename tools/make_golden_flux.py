"""Write the golden tensors of tests/test_flux_sampling.py by running the RELEASE's x-flux sampler on a tiny FLUX.

The released FLUX aligner saw images sampled by the release's `demo_flux.py` through its vendored x-flux
(`third_party/flux/sampling.py`: `get_schedule`, `prepare`, `denoise`; `modules/layers.py`:
`IPDoubleStreamBlockProcessor`). This script runs that code, unchanged, from a checkout of the release
(SHI-Labs/IMG-Multimodal-Diffusion-Alignment at 3b7abdd) on a tiny random FLUX built with x-flux's own
`Flux` class, the way `demo_flux.py` calls `XFluxPipeline.forward`: 

    round 0       true_gs 3.5, timestep_to_start_cfg 1, guidance 3.5, neg prompt "", image_proj = neg_image_proj,
                  ip_scale 0, neg_ip_scale 0
    re-generation the same with image_proj = the aligned tokens, ip_scale 0.2, neg_ip_scale 0.2

and writes into tests/golden/flux_sampling/:

    transformer/                 the tiny transformer in diffusers' layout (config.json + safetensors)
    ip_adapter.safetensors       its IP-Adapter in XLabs' layout (what diffusers' `load_ip_adapter` reads)
    golden.safetensors           inputs (packed noise, T5/CLIP text embeddings of prompt and "", aligned and
                                 black-image IP tokens) and the release's outputs (packed latents after
                                 denoising: `round0_latents`, `regenerated_latents`; the `timesteps` list)
    recipe.json                  sizes, settings, versions and what each tensor is

What is NOT run through the release here, on purpose: the T5/CLIP text encoders, the CLIP image encoder and
IP projection (tested elsewhere; the tokens and embeddings are inputs), the VAE (the golden is the latents),
and x-flux's `get_noise` (the packed noise is an input to both sides: its layout is a random-number detail).
Tiny sizes: hidden 32 (2 heads x 16, rope axes 4/4/8), 2 double + 1 single blocks, T5/CLIP widths 32,
128x128 px (so x-flux's `(W//8)*(H//8)//256` rule gives 1 where diffusers counts 64 tokens), 4 steps,
float32. The release hard-codes IPDoubleStreamBlockProcessor(4096, 3072); the tiny one is (32, 32).
The x-flux -> diffusers key mapping below is the inverse of diffusers' own single-file converter
(`convert_flux_transformer_checkpoint_to_diffusers`, which hard-codes FLUX's 3072 width).

Regenerating is never part of `make test`. Run it with the release's environment from tools/make_golden.py
(/work/golden-venv: torch 2.13 CPU, einops 0.6.1, transformers 4.37.2; x-flux needs nothing more):

    /work/golden-venv/bin/python tools/make_golden_flux.py --release /work/golden-src/IMG \
        --out tests/golden/flux_sampling

It takes a few seconds. Never copy the release's code into this repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

SEED = 0
WIDTH, HEIGHT = 128, 128
STEPS = 4
GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance (demo_flux.py)
TRUE_GS = 3.5  # true CFG scale (demo_flux.py)
TIMESTEP_TO_START_CFG = 1  # demo_flux.py
REGENERATION_IP_SCALE = 0.2  # demo_flux.py: ip_scale = neg_ip_scale = 0.2; round 0: both 0
HIDDEN, HEADS, AXES = 32, 2, [4, 4, 8]
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 1
TEXT_WIDTH, POOLED_WIDTH, TEXT_TOKENS = 32, 32, 8
IP_TOKENS = 4
LATENT_CHANNELS = 16  # x-flux's get_noise; packed 2x2 -> 64 transformer input channels


def xflux_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x-flux (BFL) transformer keys -> diffusers' FluxTransformer2DModel keys (any width)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(source: str, target: str) -> None:
        out[target] = state.pop(source)

    for source, target in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")]:
        for x, d in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for kind in ("weight", "bias"):
                move(f"{source}.{x}.{kind}", f"time_text_embed.{target}.{d}.{kind}")
    for kind in ("weight", "bias"):
        move(f"txt_in.{kind}", f"context_embedder.{kind}")
        move(f"img_in.{kind}", f"x_embedder.{kind}")
    for i in range(DOUBLE_BLOCKS):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            move(f"{s}img_mod.lin.{kind}", f"{d}norm1.linear.{kind}")
            move(f"{s}txt_mod.lin.{kind}", f"{d}norm1_context.linear.{kind}")
            for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                for name, part in zip(names, state.pop(f"{s}{stream}_attn.qkv.{kind}").chunk(3, dim=0)):
                    out[f"{d}attn.{name}.{kind}"] = part.clone()
            move(f"{s}img_mlp.0.{kind}", f"{d}ff.net.0.proj.{kind}")
            move(f"{s}img_mlp.2.{kind}", f"{d}ff.net.2.{kind}")
            move(f"{s}txt_mlp.0.{kind}", f"{d}ff_context.net.0.proj.{kind}")
            move(f"{s}txt_mlp.2.{kind}", f"{d}ff_context.net.2.{kind}")
            move(f"{s}img_attn.proj.{kind}", f"{d}attn.to_out.0.{kind}")
            move(f"{s}txt_attn.proj.{kind}", f"{d}attn.to_add_out.{kind}")
        move(f"{s}img_attn.norm.query_norm.scale", f"{d}attn.norm_q.weight")
        move(f"{s}img_attn.norm.key_norm.scale", f"{d}attn.norm_k.weight")
        move(f"{s}txt_attn.norm.query_norm.scale", f"{d}attn.norm_added_q.weight")
        move(f"{s}txt_attn.norm.key_norm.scale", f"{d}attn.norm_added_k.weight")
    for i in range(SINGLE_BLOCKS):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            move(f"{s}modulation.lin.{kind}", f"{d}norm.linear.{kind}")
            q, k, v, mlp = state.pop(f"{s}linear1.{kind}").split([HIDDEN, HIDDEN, HIDDEN, 4 * HIDDEN], dim=0)
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[f"{d}{name}.{kind}"] = part.clone()
            move(f"{s}linear2.{kind}", f"{d}proj_out.{kind}")
        move(f"{s}norm.query_norm.scale", f"{d}attn.norm_q.weight")
        move(f"{s}norm.key_norm.scale", f"{d}attn.norm_k.weight")
    for kind in ("weight", "bias"):
        move(f"final_layer.linear.{kind}", f"proj_out.{kind}")
        shift, scale = state.pop(f"final_layer.adaLN_modulation.1.{kind}").chunk(2, dim=0)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift], dim=0)  # diffusers orders scale, shift
    if state:
        raise RuntimeError(f"unmapped x-flux keys: {sorted(state)}")
    return out


DIFFUSERS_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,
    "num_layers": DOUBLE_BLOCKS,
    "num_single_layers": SINGLE_BLOCKS,
    "attention_head_dim": HIDDEN // HEADS,
    "num_attention_heads": HEADS,
    "joint_attention_dim": TEXT_WIDTH,
    "pooled_projection_dim": POOLED_WIDTH,
    "guidance_embeds": True,
    "axes_dims_rope": AXES,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="checkout of the release at 3b7abdd")
    parser.add_argument("--out", type=Path, default=Path("tests/golden/flux_sampling"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.release))
    import einops
    from safetensors.torch import save_file

    from third_party.flux.model import Flux, FluxParams
    from third_party.flux.modules.layers import IPDoubleStreamBlockProcessor
    from third_party.flux.sampling import denoise, get_noise, get_schedule, prepare

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)

    # 1. a tiny FLUX.1-dev in x-flux's layout, with random (not default) norm scales so the mapping is tested
    params = FluxParams(
        in_channels=4 * LATENT_CHANNELS, vec_in_dim=POOLED_WIDTH, context_in_dim=TEXT_WIDTH, hidden_size=HIDDEN,
        mlp_ratio=4.0, num_heads=HEADS, depth=DOUBLE_BLOCKS, depth_single_blocks=SINGLE_BLOCKS, axes_dim=AXES,
        theta=10_000, qkv_bias=True, guidance_embed=True,
    )
    model = Flux(params).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".scale"):
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))

    # 2. the XLabs IP-Adapter: k/v projections per double block (random: x-flux initialises them to zero),
    #    loaded the way XFluxPipeline.set_ip does, plus a projection model in the file for diffusers' loader
    ip_weights: dict[str, torch.Tensor] = {
        "ip_adapter_proj_model.proj.weight": 0.1 * torch.randn(IP_TOKENS * TEXT_WIDTH, 16, generator=generator),
        "ip_adapter_proj_model.proj.bias": torch.zeros(IP_TOKENS * TEXT_WIDTH),
        "ip_adapter_proj_model.norm.weight": torch.ones(TEXT_WIDTH),
        "ip_adapter_proj_model.norm.bias": torch.zeros(TEXT_WIDTH),
    }
    processors = {}
    for name in model.attn_processors:
        if not name.startswith("double_blocks."):
            processors[name] = model.attn_processors[name]
            continue
        processor = IPDoubleStreamBlockProcessor(TEXT_WIDTH, HIDDEN)
        with torch.no_grad():
            for parameter in processor.parameters():
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
        for key, value in processor.state_dict().items():
            ip_weights[f"{name}.{key}"] = value.clone()
        processors[name] = processor
    model.set_attn_processor(processors)

    # 3. inputs: noise (x-flux's get_noise layout), text embeddings of the prompt and of "", IP tokens
    noise = get_noise(1, HEIGHT, WIDTH, device="cpu", dtype=torch.float32, seed=SEED)  # (1, 16, H/8, W/8)
    txt = torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator)
    vec = torch.randn(1, POOLED_WIDTH, generator=generator)
    neg_txt = torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator)
    neg_vec = torch.randn(1, POOLED_WIDTH, generator=generator)
    aligned_tokens = torch.randn(1, IP_TOKENS, TEXT_WIDTH, generator=generator)
    black_tokens = torch.randn(1, IP_TOKENS, TEXT_WIDTH, generator=generator)

    # 4. the release's sampling: XFluxPipeline.forward without get_noise / text encoders / VAE
    timesteps = get_schedule(STEPS, (WIDTH // 8) * (HEIGHT // 8) // (16 * 16), shift=True)
    inp = prepare(t5=lambda prompt: txt, clip=lambda prompt: vec, img=noise, prompt="prompt")
    neg = prepare(t5=lambda prompt: neg_txt, clip=lambda prompt: neg_vec, img=noise, prompt="")
    common = dict(
        timesteps=timesteps, guidance=GUIDANCE, true_gs=TRUE_GS, timestep_to_start_cfg=TIMESTEP_TO_START_CFG,
        neg_txt=neg["txt"], neg_txt_ids=neg["txt_ids"], neg_vec=neg["vec"], neg_image_proj=black_tokens,
    )
    with torch.no_grad():
        round0 = denoise(model, **inp, **common, image_proj=black_tokens, ip_scale=0.0, neg_ip_scale=0.0)
        regenerated = denoise(
            model, **inp, **common, image_proj=aligned_tokens,
            ip_scale=REGENERATION_IP_SCALE, neg_ip_scale=REGENERATION_IP_SCALE,
        )

    # 5. write
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "transformer").mkdir(parents=True)
    xflux_state = {k: v for k, v in model.state_dict().items() if ".processor." not in k}  # IP weights: own file
    transformer_state = {k: v.contiguous() for k, v in xflux_to_diffusers(xflux_state).items()}
    save_file(transformer_state, str(args.out / "transformer" / "diffusion_pytorch_model.safetensors"))
    (args.out / "transformer" / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in ip_weights.items()}, str(args.out / "ip_adapter.safetensors"))
    golden = {
        "packed_noise": inp["img"], "prompt_embeds": txt, "pooled_prompt_embeds": vec,
        "negative_prompt_embeds": neg_txt, "negative_pooled_prompt_embeds": neg_vec,
        "aligned_tokens": aligned_tokens, "black_tokens": black_tokens,
        "timesteps": torch.tensor(timesteps, dtype=torch.float64),
        "round0_latents": round0, "regenerated_latents": regenerated,
    }
    save_file({k: v.contiguous() for k, v in golden.items()}, str(args.out / "golden.safetensors"))
    recipe = {
        "release": "SHI-Labs/IMG-Multimodal-Diffusion-Alignment@3b7abdd third_party/flux (x-flux)",
        "versions": {"torch": torch.__version__, "einops": einops.__version__},
        "seed": SEED, "width": WIDTH, "height": HEIGHT, "steps": STEPS, "guidance": GUIDANCE,
        "true_gs": TRUE_GS, "timestep_to_start_cfg": TIMESTEP_TO_START_CFG,
        "regeneration_ip_scale": REGENERATION_IP_SCALE, "round0_ip_scale": 0.0,
        "schedule_sequence_length": (WIDTH // 8) * (HEIGHT // 8) // (16 * 16),
        "tensors": {
            "packed_noise": "get_noise(1, H, W, seed) packed by x-flux's prepare: (1, H/16*W/16, 64)",
            "prompt_embeds/pooled_prompt_embeds": "stand-ins for T5 / CLIP outputs of the prompt (random)",
            "negative_prompt_embeds/negative_pooled_prompt_embeds": "stand-ins for T5 / CLIP outputs of ''",
            "aligned_tokens": "post-projection IP tokens of the re-generation (random)",
            "black_tokens": "post-projection IP tokens of the black image (random stand-in)",
            "timesteps": "get_schedule(steps, (W//8)*(H//8)//256, shift=True)",
            "round0_latents": "denoise(..., image_proj=black_tokens, ip_scale=0, neg_ip_scale=0)",
            "regenerated_latents": "denoise(..., image_proj=aligned_tokens, ip_scale=0.2, neg_ip_scale=0.2)",
        },
    }
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {args.out}: round0 |x| {round0.abs().mean():.4f}, regenerated |x| {regenerated.abs().mean():.4f}, "
          f"difference {(regenerated - round0).abs().max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
