"""Write the golden tensors of tests/test_fidelity.py by running the AUTHORS' RELEASE on tiny weights.

IMG's released aligners were trained on the guidance and image features that the authors' code computes,
so this project checks that it computes the same numbers (README "Fidelity to the release"). This script
runs the release's own code (SHI-Labs/IMG-Multimodal-Diffusion-Alignment at 3b7abdd with the LLaVA code
base it installs, haotian-liu/LLaVA at c121f04) under the versions the release pins, on tiny random
weights in the release's layouts, and writes into tests/golden/:

    llava/                     tiny LLaVA in the ORIGINAL code-base layout (config, safetensors, tokenizer.model)
    clip-vision-336/           its tiny CLIP vision tower + preprocessor_config.json
    sdxl/                      tiny SDXL pipeline (diffusers folder)
    ip-adapter/                tiny IP-Adapter plus in h94's layout (sdxl_models/*.safetensors, models/image_encoder/)
    aligner/aligner_sdxl.pth   tiny aligner (the release's Resampler_cross state dict)
    aligner/resampler.pth      tiny feature Resampler (the release's Resampler; differs from the IP-Adapter's)
    golden.safetensors         the release's outputs (below)
    recipe.json                prompt, question, seed, sizes, versions and how each tensor was made

Golden tensors: `guidance` = LLaVA hidden_states[-1] over system + image tokens + question for the
round-0 image (`eval_model(..., generate=False, layer=-1)` of the release), with its `input_ids` and
`llava_pixel_values`; `ip_features` = `get_ip_feat` (CLIP hidden_states[-2] -> resampler.pth);
`ip_negative_features` = the IP-Adapter's unconditional tokens (`get_image_embeds_feat`: projection of
CLIP(zeros 224x224)); `ip_adapter_features` = the IP-Adapter's own projection of the image;
`aligned_features` = the aligner applied 3 times; `round0_image` (the plain SDXL pipeline) and
`regenerated_image` (`IPAdapterPlusXL.generate_from_feat` with the aligned tokens at scale 0.2), uint8 HWC.

Differences from the demo, on purpose: tiny dimensions (the demo hard-codes 1280/2048/5120-wide modules:
the tiny IP-Adapter subclass only overrides `init_proj` with the same Resampler class at tiny width), few
steps and a 56x40 image, float32 everywhere (the demo casts to fp16/bf16; every tiny weight is rounded to
a float16-representable value, so the release's fp16 loading paths lose nothing before we cast back to
float32), and a fixed question string instead of `random.choice` over its instruction list.

Regenerating the goldens is never part of `make test`. To regenerate (Python 3.11, outside this repo):

    python3.11 -m venv /work/golden-venv
    /work/golden-venv/bin/pip install torch==2.13.0 transformers==4.37.2 diffusers==0.20.0 \
        'huggingface_hub<0.26' accelerate==0.21.0 tokenizers==0.15.1 'numpy<2' pillow==10.4.0 \
        safetensors einops==0.6.1 einops-exts sentencepiece==0.1.99 protobuf
    # (no torchvision: a torchvision that does not match torch breaks transformers' imports)
    mkdir -p /work/golden-src/IMG /work/golden-src/LLaVA
    git -C <IMG mirror> archive 3b7abdd | tar -x -C /work/golden-src/IMG
    git -C <LLaVA mirror> archive c121f04 llava pyproject.toml | tar -x -C /work/golden-src/LLaVA
    /work/golden-venv/bin/python tools/make_golden.py --release /work/golden-src/IMG \
        --llava /work/golden-src/LLaVA --out tests/golden

It takes about a minute on 2 CPU cores. Never copy the release's code into this repository.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SEED = 0
PROMPT = "a red cube on a blue table"
# One fixed question (the release draws one of its instructions at random); both sides pass it as is.
QUESTION = "How can the image match the intended prompt: {prompt}?"
ROUND_SEED = 7
STEPS = 4
GUIDANCE_SCALE = 7.5
WIDTH, HEIGHT = 56, 40  # not a multiple of the 32 px LLaVA input: a real (non-integer) resize
IP_SCALE = 0.2
ALIGNER_PASSES = 3
IP_TOKENS = 16
SDXL_CROSS_ATTENTION_DIM = 64  # width of the tiny IP tokens (real: 2048)
LLAVA_HIDDEN = 64  # Dg of the tiny LLaVA (real: 5120)
LLAVA_CLIP_SIZE, LLAVA_CLIP_PATCH = 32, 8
IP_CLIP_SIZE, IP_CLIP_PATCH = 224, 32  # 224: the release hard-codes 224x224 zeros for the negative tokens
RESAMPLER_HIDDEN = 32
ALIGNER_HEADS = 2
DIM_HEAD = 64  # the release's dim_head; diffusers reads IP-Adapter heads as to_q rows // 64
WRITTEN = ("llava", "clip-vision-336", "sdxl", "ip-adapter", "aligner", "golden.safetensors", "recipe.json")
RELEASE_COMMIT = "3b7abdd"
LLAVA_COMMIT = "c121f04"
TOKENIZER_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "###Human: \n###Assistant:",
    QUESTION.replace("{prompt}", PROMPT),
    "the quick brown fox jumps over the lazy dog; what should change in the image to match the text?",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,:;!?'\"()[]{}<>#/-_+=*&%$@",
]


def fp16_exact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to float16 and back: the release's fp16 loading paths then lose nothing."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.float16).to(torch.float32)


def round_module_(module: torch.nn.Module, scale: float | None = None, generator=None) -> torch.nn.Module:
    """Make every parameter float16-exact; with `scale`, first redraw it as N(0, scale^2) (norms stay 1/0)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if scale is not None and parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            parameter.copy_(fp16_exact(parameter))
    return module


def save_safetensors_folder(model, folder: Path) -> None:
    """Save in float16 (exact: every weight is float16-exact) to keep tests/golden small."""
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def half_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(torch.float16).contiguous() for key, value in state_dict.items()}


# ----------------------------------------------------------------------------------------------- LLaVA


def build_sentencepiece_tokenizer(folder: Path) -> None:
    """A Llama-style sentencepiece BPE (byte fallback, identity normalisation, `<unk> <s> </s>` = 0 1 2)."""
    import sentencepiece as spm

    model = io.BytesIO()  # trained from an iterator into memory: no temporary paths in the model file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "legacy": False,
                "model_max_length": 2048,
                "padding_side": "right",
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )


def build_tiny_llava(out: Path, generator: torch.Generator) -> tuple[Path, Path]:
    """tests/golden/llava (original layout) and tests/golden/clip-vision-336 (its vision tower)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer

    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    clip_folder, llava_folder = out / "clip-vision-336", out / "llava"
    torch.manual_seed(SEED + 10)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=LLAVA_CLIP_SIZE,
            patch_size=LLAVA_CLIP_PATCH,
            projection_dim=32,
        )
    ).eval()
    round_module_(clip, 0.1, generator)
    save_safetensors_folder(clip, clip_folder)
    CLIPImageProcessor(
        size={"shortest_edge": LLAVA_CLIP_SIZE}, crop_size={"height": LLAVA_CLIP_SIZE, "width": LLAVA_CLIP_SIZE}
    ).save_pretrained(clip_folder)

    llava_folder.mkdir(parents=True, exist_ok=True)
    build_sentencepiece_tokenizer(llava_folder)
    tokenizer = LlamaTokenizer.from_pretrained(str(llava_folder))
    config = LlavaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAVA_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
        mm_vision_tower=str(clip_folder),
        mm_hidden_size=clip.config.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        mm_patch_merge_type="flat",
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    config.architectures = ["LlavaLlamaForCausalLM"]
    torch.manual_seed(SEED + 11)
    model = LlavaLlamaForCausalLM(config).eval()  # the vision tower is only configured (delay_load)
    round_module_(model, 0.1, generator)
    config.torch_dtype = "float16"
    save_safetensors_folder(model, llava_folder)
    return llava_folder, clip_folder


def rebuild_rotary_tables_in_float32(model) -> None:
    """load_pretrained_model loads in float16, so transformers 4.37 builds Llama's rotary cos/sin tables in
    float16 (the default dtype during init); rebuild them in float32 with the same formula."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for module in model.modules():
        if isinstance(module, LlamaRotaryEmbedding):
            steps = torch.arange(0, module.dim, 2).float()
            module.inv_freq = 1.0 / (module.base ** (steps / module.dim))
            module._set_cos_sin_cache(module.max_position_embeddings, module.inv_freq.device, torch.float32)


@torch.no_grad()
def release_guidance(llava_folder: Path, image, question: str) -> dict[str, torch.Tensor]:
    """The release's `eval_model(..., generate=False, layer=-1)` in float32, plus its inputs."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from src.run_llava_gen import eval_model

    model_path = str(llava_folder)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        model_path=model_path, model_base=None, model_name=get_model_name_from_path(model_path),
        device_map="cpu", device="cpu",
    )
    model = model.to(torch.float32).eval()  # the demo casts to bf16; golden values are float32
    rebuild_rotary_tables_in_float32(model)
    query = question.replace("{prompt}", PROMPT)
    args = type("Args", (), {
        "model_path": model_path, "model_base": None, "model_name": get_model_name_from_path(model_path),
        "query": query, "conv_mode": None, "image_file": [image], "sep": ",", "temperature": 0,
        "top_p": None, "num_beams": 1, "max_new_tokens": 512,
    })()  # the demo's own call shape
    hidden_states, _ = eval_model(args, tokenizer, model, image_processor, context_len,
                                  dtype=torch.float32, generate=False, layer=-1)
    # The same prompt/ids/pixels eval_model built, for diagnosing a mismatch on our side.
    from llava.conversation import conv_templates

    conv = conv_templates[args.conv_mode].copy()
    conv.append_message(conv.roles[0], "<image>\n" + query)
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    pixel_values = process_images([image], image_processor, model.config)
    return {
        "guidance": hidden_states.float().contiguous(),
        "input_ids": input_ids.unsqueeze(0).contiguous(),
        "llava_pixel_values": pixel_values.float().contiguous(),
        "conv_mode": args.conv_mode,
    }


# ------------------------------------------------------------------------------------------------ SDXL


def build_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single characters (no merges): vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;!?'-")
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def build_tiny_sdxl(out: Path, generator: torch.Generator) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp))
    torch.manual_seed(SEED + 20)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=SDXL_CROSS_ATTENTION_DIM,
        norm_num_groups=8,
    )
    torch.manual_seed(SEED + 21)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    torch.manual_seed(SEED + 22)
    text_encoder = CLIPTextModel(text_config())
    torch.manual_seed(SEED + 23)
    text_encoder_2 = CLIPTextModelWithProjection(text_config())
    for module in (unet, vae, text_encoder, text_encoder_2):
        round_module_(module)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
    pipeline.to(torch_dtype=torch.float16)
    pipeline.save_pretrained(out / "sdxl", safe_serialization=True)
    return out / "sdxl"


def random_resampler_state(embedding_dim: int, generator: torch.Generator, resampler_class) -> dict:
    """A release `Resampler` (IP-Adapter plus layout) with every tensor random, float16-exact."""
    resampler = resampler_class(
        dim=RESAMPLER_HIDDEN, depth=4, dim_head=DIM_HEAD, heads=1, num_queries=IP_TOKENS,
        embedding_dim=embedding_dim, output_dim=SDXL_CROSS_ATTENTION_DIM, ff_mult=4,
    )
    round_module_(resampler, 0.1, generator)
    with torch.no_grad():
        for name, parameter in resampler.named_parameters():
            if parameter.dim() == 1:  # norms and biases: random too, so every tensor is exercised
                parameter.copy_(fp16_exact(parameter + 0.05 * torch.randn(parameter.shape, generator=generator)))
    return {key: value.contiguous() for key, value in resampler.state_dict().items()}


def build_tiny_ip_adapter(out: Path, unet, generator: torch.Generator) -> tuple[Path, dict]:
    """h94 layout: models/image_encoder/ and sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from src.resampler import Resampler

    folder = out / "ip-adapter"
    torch.manual_seed(SEED + 30)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
            image_size=IP_CLIP_SIZE, patch_size=IP_CLIP_PATCH, projection_dim=32,
        )
    ).eval()
    round_module_(encoder, 0.1, generator)
    save_safetensors_folder(encoder, folder / "models" / "image_encoder")
    image_proj = random_resampler_state(encoder.config.hidden_size, generator, Resampler)
    ip_layers = {}
    for index, name in enumerate(unet.attn_processors):  # release/h94 numbering: index among all processors
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
            for kind in ("to_k_ip", "to_v_ip"):
                ip_layers[f"{index}.{kind}.weight"] = fp16_exact(torch.randn(to_k.shape, generator=generator) * 0.5)
    weights = {f"image_proj.{k}": v for k, v in image_proj.items()}
    weights.update({f"ip_adapter.{k}": v for k, v in ip_layers.items()})
    (folder / "sdxl_models").mkdir(parents=True, exist_ok=True)
    save_file(half_state(weights), str(folder / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"))
    return folder, image_proj


def tiny_ip_adapter_class():
    """The release's IPAdapterPlusXL (fp16 variant the demo uses) with `init_proj` at tiny width."""
    from src.resampler import Resampler  # noqa: F401 - the demo's module; the adapter uses its own copy
    from third_party.ip_adapter import IPAdapterPlusXL_fp16
    from third_party.ip_adapter.resampler import Resampler as AdapterResampler

    class TinyIPAdapterPlusXL(IPAdapterPlusXL_fp16):
        def init_proj(self):
            return AdapterResampler(
                dim=RESAMPLER_HIDDEN, depth=4, dim_head=DIM_HEAD, heads=1, num_queries=self.num_tokens,
                embedding_dim=self.image_encoder.config.hidden_size,
                output_dim=self.pipe.unet.config.cross_attention_dim, ff_mult=4,
            ).to(self.device, dtype=torch.float16)

    return TinyIPAdapterPlusXL


# ------------------------------------------------------------------------------------------------ main


def image_array(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, type=Path, help="checkout of IMG-Multimodal-Diffusion-Alignment")
    parser.add_argument("--llava", required=True, type=Path, help="checkout of haotian-liu/LLaVA (llava/ package)")
    parser.add_argument("--out", default=Path("tests/golden"), type=Path)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.llava.resolve()), str(args.release.resolve())]
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from src.resampler import Resampler, Resampler_cross
    from src.utils import get_ip_feat

    torch.set_num_threads(2)
    out = args.out
    for name in WRITTEN:  # only what this script writes: tests/golden also holds other goldens
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)

    # 1. tiny weights in the release's layouts
    llava_folder, clip_folder = build_tiny_llava(out, generator)
    sdxl_folder = build_tiny_sdxl(out, generator)
    sdxl_pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), torch_dtype=torch.float32)
    ip_folder, ip_image_proj = build_tiny_ip_adapter(out, sdxl_pipe.unet, generator)
    encoder_folder = ip_folder / "models" / "image_encoder"
    aligner_folder = out / "aligner"
    aligner_folder.mkdir()
    resampler_state = random_resampler_state(32, generator, Resampler)  # the release's separate resampler.pth
    torch.save(half_state(resampler_state), aligner_folder / "resampler.pth")
    aligner = Resampler_cross(
        dim=SDXL_CROSS_ATTENTION_DIM, depth=4, dim_head=DIM_HEAD, heads=ALIGNER_HEADS, num_queries=IP_TOKENS,
        embedding_dim=LLAVA_HIDDEN, output_dim=SDXL_CROSS_ATTENTION_DIM, ff_mult=4,
    )
    round_module_(aligner, 0.1, generator)
    with torch.no_grad():  # zero_linear starts at zero (identity); random here so the test sees the math
        for parameter in (aligner.zero_linear.weight, aligner.zero_linear.bias):
            parameter.copy_(fp16_exact(torch.randn(parameter.shape, generator=generator) * 0.1))
    torch.save(half_state({f"module.{k}": v for k, v in aligner.state_dict().items()}), aligner_folder / "aligner_sdxl.pth")
    aligner = aligner.eval()

    # 2. round 0: the demo's plain SDXL pipeline
    round0 = sdxl_pipe(PROMPT, generator=torch.Generator().manual_seed(ROUND_SEED), num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE_SCALE, width=WIDTH, height=HEIGHT).images[0]

    # 3. IP features: get_ip_feat with CLIPImageProcessor() + CLIPVisionModel + the separate resampler
    ip_clip = CLIPVisionModel.from_pretrained(str(encoder_folder)).eval()
    ip_resampler = Resampler(
        dim=RESAMPLER_HIDDEN, depth=4, dim_head=DIM_HEAD, heads=1, num_queries=IP_TOKENS,
        embedding_dim=32, output_dim=SDXL_CROSS_ATTENTION_DIM, ff_mult=4,
    )
    ip_resampler.load_state_dict(torch.load(aligner_folder / "resampler.pth"))
    ip_resampler.eval()
    ip_image_processor = CLIPImageProcessor()
    ip_features = get_ip_feat(round0, ip_image_processor, ip_clip, ip_resampler).float()
    ip_pixel_values = ip_image_processor(round0, return_tensors="pt").pixel_values

    # 4. guidance: the release's LLaVA path on the round-0 image
    guidance = release_guidance(llava_folder, round0, QUESTION)

    # 5. three aligner passes, float32 (the demo's loop)
    with torch.no_grad():
        aligned = ip_features
        for _ in range(ALIGNER_PASSES):
            aligned = aligner(guidance["guidance"], aligned)

    # 6. re-generation: IPAdapterPlusXL.generate_from_feat with a second pipeline, as the demo does
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), torch_dtype=torch.float32,
                                                     add_watermarker=False)
    ip_model = tiny_ip_adapter_class()(
        pipe, str(encoder_folder), str(ip_folder / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"),
        "cpu", num_tokens=IP_TOKENS,
    )
    ip_model.image_encoder.float()  # the release casts to fp16; golden values are float32
    ip_model.image_proj_model.float()
    ip_model.pipe.unet.float()
    with torch.no_grad():
        positive, negative = ip_model.get_image_embeds_feat(clip_image_embeds=aligned)
        # get_image_embeds(round0) casts the pixels to float16; the same computation in float32:
        clip_hidden = ip_model.image_encoder(ip_pixel_values, output_hidden_states=True).hidden_states[-2]
        ip_adapter_features = ip_model.image_proj_model(clip_hidden)
    regenerated = ip_model.generate_from_feat(
        feat=aligned, num_samples=1, num_inference_steps=STEPS, scale=IP_SCALE, prompt=PROMPT, seed=ROUND_SEED,
        guidance_scale=GUIDANCE_SCALE, width=WIDTH, height=HEIGHT,
    )[0]

    # 7. write
    tensors = {
        "guidance": guidance["guidance"],
        "input_ids": guidance["input_ids"],
        "llava_pixel_values": guidance["llava_pixel_values"],
        "ip_pixel_values": ip_pixel_values.float(),
        "ip_features": ip_features,
        "ip_negative_features": negative.float(),
        "ip_adapter_features": ip_adapter_features.float(),
        "aligned_features": aligned.float(),
        "round0_image": image_array(round0),
        "regenerated_image": image_array(regenerated),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "golden.safetensors"))
    # Portable paths: our side passes the vision tower folder explicitly.
    config_path = llava_folder / "config.json"
    config = json.loads(config_path.read_text())
    config["mm_vision_tower"] = clip_folder.name
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    recipe = {
        "release": f"SHI-Labs/IMG-Multimodal-Diffusion-Alignment@{RELEASE_COMMIT}",
        "llava": f"haotian-liu/LLaVA@{LLAVA_COMMIT}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__},
        "prompt": PROMPT,
        "question": QUESTION,
        "conv_mode": guidance["conv_mode"],
        "seed": ROUND_SEED,
        "steps": STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "width": WIDTH,
        "height": HEIGHT,
        "ip_scale": IP_SCALE,
        "aligner_passes": ALIGNER_PASSES,
        "weights_seed": SEED,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    equal_to_adapter = all(torch.equal(resampler_state[k], ip_image_proj[k]) for k in resampler_state)
    print(f"wrote {out} (resampler.pth equals the IP-Adapter projection: {equal_to_adapter})")
    for key, value in tensors.items():
        print(f"  {key}: {tuple(value.shape)} {value.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
