"""Presets: everything a session needs to know to load one IMG stack, as data.

Real presets name hub ids (REFERENCE §3-§5); tiny presets name folders under the tiny-models root that
`img_core.tiny.models.ensure_tiny_models` builds. Both go through the same loaders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from img_core.errors import InvalidInputError

IMG_HUB_REPO = "shi-labs/IMG"


@dataclass(frozen=True)
class IPAdapterSource:
    """Where the IP-Adapter weights and its CLIP image encoder come from.

    SDXL (h94/IP-Adapter layout): `image_encoder` is a folder inside `repo` ("models/image_encoder").
    FLUX (XLabs layout): `image_encoder` is a model id or path of its own ("openai/clip-vit-large-patch14").
    """

    repo: str
    weight_name: str
    subfolder: str = ""
    image_encoder: str = "models/image_encoder"


@dataclass(frozen=True)
class AlignerSource:
    """Either an official `.pth` (`repo` + `filename`, REFERENCE §2) or a `save_pretrained` folder/repo."""

    repo: str
    filename: str | None = None  # set: official checkpoint file inside `repo`; None: `repo` is a saved folder
    mllm: str | None = None  # metadata for official checkpoints: the MLLM it was trained with
    chat_template: str | None = None


@dataclass(frozen=True)
class FluxSampling:
    """How FLUX images are sampled (img_core/backends/flux_sampling.py, REFERENCE §4).

    true_cfg_scale > 1 runs a second transformer pass per step with the empty negative prompt and the
    black image's IP tokens (true classifier-free guidance): about 2x the time. It starts at step
    `true_cfg_start_step` (0-based; the release: 1). sigma_schedule "release" computes the time shift from
    x-flux's (W//8)*(H//8)//256, "diffusers" from the packed token count, as FluxPipeline does."""

    true_cfg_scale: float = 1.0
    true_cfg_start_step: int = 0
    sigma_schedule: str = "diffusers"  # one of img_core.backends.flux_sampling.SCHEDULES


FLUX_SAMPLINGS: dict[str, FluxSampling] = {
    # The release's demo_flux.py, which made the images the released FLUX aligner was trained and judged
    # on: true CFG 3.5 from the second step, x-flux's schedule. 59 transformer passes for 30 steps.
    "release": FluxSampling(true_cfg_scale=3.5, true_cfg_start_step=1, sigma_schedule="release"),
    # Standard FLUX.1-dev (guidance distillation only, one pass per step): ~2x faster, on the release's
    # sigma schedule (which costs nothing).
    "fast": FluxSampling(true_cfg_scale=1.0, true_cfg_start_step=0, sigma_schedule="release"),
    # Exactly what diffusers' FluxPipeline does by default.
    "diffusers": FluxSampling(),
}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "sdxl" | "flux"
    description: str
    pipeline_id: str
    ip_adapter: IPAdapterSource
    aligner: AlignerSource
    mllm: str  # a key of img_core.mllm.KNOWN_MLLMS
    default_steps: int
    default_guidance_scale: float
    width: int
    height: int
    dtype: str = "float16"  # on CUDA; CPU always runs float32
    unet_id: str | None = None  # SDXL-DPO: a repo whose unet/ replaces the pipeline's
    variant: str | None = None
    ip_scale: float = 0.2
    aligner_passes: int = 3
    # Question source (img_core.questions): the released aligners were trained with the release's questions.
    questions: str = "ours"
    flux_sampling: FluxSampling = FluxSampling()  # FLUX only: how images are sampled (see FLUX_SAMPLINGS)
    # Diffusion-side quantization on CUDA (bitsandbytes): which components, and the default.
    quantize_components: tuple[str, ...] = ("unet",)
    diffusion_quantization: str = "none"
    # Estimated peak GPU memory with every model resident at the default settings (GiB; from
    # benchmarks/bench_core.py). A session offloads the pipeline automatically on smaller GPUs.
    resident_gib: float = 0.0
    is_tiny: bool = False

    @property
    def true_cfg_scale(self) -> float:
        return self.flux_sampling.true_cfg_scale

    def resolved(self, tiny_root: Path) -> "Preset":
        """For tiny presets, turn folder names into absolute paths under `tiny_root`."""
        if not self.is_tiny:
            return self

        def under_root(name: str) -> str:
            return str(Path(tiny_root) / name)

        return dataclasses.replace(
            self,
            pipeline_id=under_root(self.pipeline_id),
            unet_id=under_root(self.unet_id) if self.unet_id else None,
            ip_adapter=dataclasses.replace(
                self.ip_adapter,
                repo=under_root(self.ip_adapter.repo),
                image_encoder=(
                    under_root(self.ip_adapter.image_encoder)
                    if self.family == "flux"
                    else self.ip_adapter.image_encoder
                ),
            ),
            aligner=dataclasses.replace(self.aligner, repo=under_root(self.aligner.repo)),
        )


_SDXL_IP_ADAPTER = IPAdapterSource(
    repo="h94/IP-Adapter",
    subfolder="sdxl_models",
    weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
    image_encoder="models/image_encoder",
)
_SDXL_ALIGNER = AlignerSource(repo=IMG_HUB_REPO, filename="aligner_sdxl.pth", mllm="img-llava-13b", chat_template="llava-v0")

PRESETS: dict[str, Preset] = {
    "sdxl": Preset(
        name="sdxl",
        family="sdxl",
        description="Stable Diffusion XL base 1.0 + IP-Adapter plus (ViT-H), IMG aligner, IMG LLaVA-1.5-13B",
        pipeline_id="stabilityai/stable-diffusion-xl-base-1.0",
        variant="fp16",
        ip_adapter=_SDXL_IP_ADAPTER,
        aligner=_SDXL_ALIGNER,
        mllm="img-llava-13b",
        questions="release",
        default_steps=50,
        default_guidance_scale=7.5,
        width=1024,
        height=1024,
        resident_gib=21.1,
    ),
    "flux-dev": Preset(
        name="flux-dev",
        family="flux",
        description="FLUX.1-dev + XLabs IP-Adapter, IMG aligner, IMG LLaVA-1.5-13B",
        pipeline_id="black-forest-labs/FLUX.1-dev",
        dtype="bfloat16",
        flux_sampling=FLUX_SAMPLINGS["release"],  # REFERENCE §4; FLUX_SAMPLINGS["fast"] halves the time
        quantize_components=("transformer", "text_encoder_2"),
        diffusion_quantization="bnb-nf4",  # bf16 FLUX alone is ~31 GB; nf4 brings it near 12 GB
        ip_adapter=IPAdapterSource(
            repo="XLabs-AI/flux-ip-adapter",
            weight_name="ip_adapter.safetensors",
            image_encoder="openai/clip-vit-large-patch14",
        ),
        aligner=AlignerSource(
            repo=IMG_HUB_REPO, filename="aligner_flux.pth", mllm="img-llava-13b", chat_template="llava-v0"
        ),
        mllm="img-llava-13b",
        questions="release",
        resident_gib=25.3,
        default_steps=30,
        default_guidance_scale=3.5,
        width=1024,
        height=1024,
    ),
    "tiny-sdxl": Preset(
        name="tiny-sdxl",
        family="sdxl",
        description="Tiny random-weight SDXL stack + tiny LLaVA, for CPU demos and tests (images are noise)",
        pipeline_id="tiny-sdxl",
        ip_adapter=dataclasses.replace(_SDXL_IP_ADAPTER, repo="tiny-ip-adapter"),
        aligner=AlignerSource(repo="tiny-aligner-sdxl"),
        mllm="tiny-llava",
        dtype="float32",
        default_steps=4,
        default_guidance_scale=7.5,
        width=64,
        height=64,
        is_tiny=True,
    ),
    "tiny-flux": Preset(
        name="tiny-flux",
        family="flux",
        description="Tiny random-weight FLUX stack + tiny Qwen2.5-VL, for CPU demos and tests (images are noise)",
        pipeline_id="tiny-flux",
        flux_sampling=FLUX_SAMPLINGS["release"],  # the release's code path; 4 tiny steps stay cheap
        ip_adapter=IPAdapterSource(
            repo="tiny-flux-ip-adapter", weight_name="ip_adapter.safetensors", image_encoder="tiny-clip-vit"
        ),
        aligner=AlignerSource(repo="tiny-aligner-flux"),
        mllm="tiny-qwen",
        dtype="float32",
        quantize_components=("transformer", "text_encoder_2"),
        default_steps=4,
        default_guidance_scale=3.5,
        width=64,
        height=64,
        is_tiny=True,
    ),
}


# SDXL-DPO = SDXL with the UNet of another repo; the tiny twin swaps in a second tiny UNet the same way.
PRESETS["sdxl-dpo"] = dataclasses.replace(
    PRESETS["sdxl"],
    name="sdxl-dpo",
    description="SDXL with the Diffusion-DPO UNet (mhdang/dpo-sdxl-text2image-v1), IMG aligner",
    unet_id="mhdang/dpo-sdxl-text2image-v1",
)
PRESETS["tiny-sdxl-dpo"] = dataclasses.replace(
    PRESETS["tiny-sdxl"],
    name="tiny-sdxl-dpo",
    description="Tiny SDXL with a second tiny UNet swapped in the way SDXL-DPO swaps its UNet",
    unet_id="tiny-sdxl-dpo-unet",
)


def needs_offload(preset: Preset, gpu_total_gib: float) -> bool:
    """Whether a GPU of `gpu_total_gib` is too small to keep every model of `preset` resident."""
    return preset.resident_gib > 0 and gpu_total_gib < preset.resident_gib + 0.5


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InvalidInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def default_preset_name() -> str:
    """`sdxl` where a CUDA GPU is present, else the CPU-friendly `tiny-sdxl`."""
    import torch

    return "sdxl" if torch.cuda.is_available() else "tiny-sdxl"
