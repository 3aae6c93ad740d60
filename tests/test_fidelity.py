"""Golden parity with the authors' release (README "Fidelity to the release").

tests/golden/ holds tiny random weights in the release's layouts and what the release's own code computed
from them (tools/make_golden.py, run under transformers 4.37.2 / diffusers 0.20.0; never part of
`make test`). Here the same weights go through this project's public loaders and feature code:
convert-llava + MLLMCritic for the guidance, the SDXL backend (diffusers' load_ip_adapter) for the IP
features and the re-generation, `ImplicitAligner.from_official_checkpoint` for the 3 aligner passes.
Features must agree to 1e-4 relative (max abs difference / max abs golden value), images to 0.5 mean
absolute difference on the 0-255 scale.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

GOLDEN = Path(__file__).parent / "golden"
RELATIVE_TOLERANCE = 1e-4
MAX_MEAN_PIXEL_DIFFERENCE = 0.5  # on 0-255
CHAT_TEMPLATES = {"llava_v0": "llava-v0", "llava_v1": "llava-v1"}  # release conv_mode -> ours


def relative_error(ours: torch.Tensor, golden: torch.Tensor) -> float:
    assert ours.shape == golden.shape, f"shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    return float((ours.float() - golden.float()).abs().max() / golden.float().abs().max())


@pytest.fixture(scope="module")
def recipe() -> dict:
    return json.loads((GOLDEN / "recipe.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "golden.safetensors"))


@pytest.fixture(scope="module")
def round0_image(golden) -> Image.Image:
    return Image.fromarray(golden["round0_image"].numpy())


@pytest.fixture(scope="module")
def question(recipe) -> str:
    return recipe["question"].replace("{prompt}", recipe["prompt"])


@pytest.fixture(scope="module")
def critic(tmp_path_factory, recipe):
    from img_core.mllm import MLLMCritic
    from img_core.weights.convert_llava import convert_llava_checkpoint

    folder = convert_llava_checkpoint(
        GOLDEN / "llava",
        tmp_path_factory.mktemp("golden") / "llava-hf",
        vision_tower=GOLDEN / "clip-vision-336",
        chat_template=CHAT_TEMPLATES[recipe["conv_mode"]],
        dtype=torch.float32,
    )
    return MLLMCritic.load(str(folder), device="cpu", dtype=torch.float32, quantization="none")


@pytest.fixture(scope="module")
def backend():
    from img_core.backends import backend_class
    from img_core.presets import PRESETS, AlignerSource

    tiny = PRESETS["tiny-sdxl"]
    preset = dataclasses.replace(
        tiny,
        pipeline_id=str(GOLDEN / "sdxl"),
        ip_adapter=dataclasses.replace(tiny.ip_adapter, repo=str(GOLDEN / "ip-adapter")),
        aligner=AlignerSource(repo=str(GOLDEN / "aligner"), filename="aligner_sdxl.pth"),
        is_tiny=False,
    )
    return backend_class("sdxl").load(preset, torch.device("cpu"), torch.float32)


def diffusion_call(recipe, ip_scale: float = 0.0):
    from img_core.backends.base import DiffusionCall

    return DiffusionCall(
        prompt=recipe["prompt"],
        seed=recipe["seed"],
        steps=recipe["steps"],
        guidance_scale=recipe["guidance_scale"],
        width=recipe["width"],
        height=recipe["height"],
        ip_scale=ip_scale,
    )


def mean_pixel_difference(image: Image.Image, golden: torch.Tensor) -> float:
    ours = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert ours.shape == tuple(golden.shape)
    return float(np.abs(ours - golden.numpy().astype(np.float64)).mean())


# ------------------------------------------------------------------------------------------ guidance


def test_llava_token_ids_equal_the_release(critic, round0_image, question, golden):
    inputs = critic.encode_conversation(round0_image, question)
    ids = inputs["input_ids"][0]
    release = golden["input_ids"][0]
    image_positions = release == -200  # the release's IMAGE_TOKEN_INDEX: one id that expands to the patches
    ours_text = ids[ids != critic.processor.image_token_id]
    assert ours_text.tolist() == release[~image_positions].tolist()
    assert int((ids == critic.processor.image_token_id).sum()) == golden["guidance"].shape[1] - len(ours_text)


def test_llava_pixels_equal_the_release(critic, round0_image, question, golden):
    inputs = critic.encode_conversation(round0_image, question)
    assert relative_error(inputs["pixel_values"].float().cpu(), golden["llava_pixel_values"]) < 1e-6


def test_guidance_equals_the_release(critic, round0_image, question, recipe, golden):
    guidance = critic.guidance(round0_image, recipe["prompt"], question=question)
    assert relative_error(guidance, golden["guidance"]) < RELATIVE_TOLERANCE


# ------------------------------------------------------------------------------------------ IP features


def test_ip_features_equal_the_release_resampler(backend, round0_image, golden):
    # The release feeds the aligner features from its own resampler.pth, not the IP-Adapter's projection.
    assert relative_error(backend.image_features(round0_image), golden["ip_features"]) < RELATIVE_TOLERANCE


def test_negative_features_equal_the_release(backend, golden):
    assert relative_error(backend.negative_features(), golden["ip_negative_features"]) < RELATIVE_TOLERANCE


def test_ip_adapter_projection_equals_the_release(backend, round0_image, golden):
    from img_core.backends.base import DiffusionBackend

    # The IP-Adapter's own projection (what h94-only setups feed the aligner) through the base feature path.
    features = DiffusionBackend.image_features(backend, round0_image)
    assert relative_error(features, golden["ip_adapter_features"]) < RELATIVE_TOLERANCE


def test_ip_pixels_are_pil_resized_like_the_release(backend, round0_image, golden):
    pixels = backend.pipeline.feature_extractor(images=round0_image, return_tensors="pt").pixel_values
    assert relative_error(pixels, golden["ip_pixel_values"]) < 1e-6


# ------------------------------------------------------------------------------------------ aligner and image


def test_three_aligner_passes_equal_the_release(golden):
    from img_core.aligner import ImplicitAligner

    aligner = ImplicitAligner.from_official_checkpoint(GOLDEN / "aligner" / "aligner_sdxl.pth").float().eval()
    with torch.no_grad():
        aligned = aligner.align(golden["ip_features"], golden["guidance"], passes=3)
    assert relative_error(aligned, golden["aligned_features"]) < RELATIVE_TOLERANCE


def test_round0_image_equals_the_release(backend, recipe, golden):
    image = backend.generate(diffusion_call(recipe))
    assert mean_pixel_difference(image, golden["round0_image"]) <= MAX_MEAN_PIXEL_DIFFERENCE


def test_regenerated_image_equals_the_release(backend, recipe, golden):
    call = diffusion_call(recipe, ip_scale=recipe["ip_scale"])
    image = backend.regenerate(call, golden["aligned_features"])
    assert mean_pixel_difference(image, golden["regenerated_image"]) <= MAX_MEAN_PIXEL_DIFFERENCE


# ------------------------------------------------------------------------------------------ fix 1: PIL resizing


def test_pil_clip_processor_resizes_like_pil_with_the_same_settings():
    from transformers import CLIPImageProcessor

    from img_core.clip_processing import pil_clip_image_processor

    size = 32
    torchvision_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = pil_clip_image_processor(torchvision_processor)
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    for setting in ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor", "do_center_crop"):
        assert getattr(processor, setting) == getattr(torchvision_processor, setting), setting
    assert pil_clip_image_processor(processor) is processor and pil_clip_image_processor(None) is None

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 45, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255  # (H, W, 3)
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)).float()[None]
    pixels = processor(images=image, return_tensors="pt").pixel_values
    assert float((pixels - expected).abs().max()) < 1e-5
    torchvision_pixels = torchvision_processor(images=image, return_tensors="pt").pixel_values
    assert float((torchvision_pixels - expected).abs().max()) > 1e-3  # what the PIL class is here to avoid


# ------------------------------------------------------------------------------------------ fix 4: resampler.pth


def test_resampler_key_map_agrees_with_diffusers_ip_adapter_loading(backend, tmp_path):
    from safetensors.torch import load_file

    from img_core.resampler import describe_equality, load_release_resampler

    weights = load_file(str(GOLDEN / "ip-adapter" / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"))
    image_proj = {key.removeprefix("image_proj."): value for key, value in weights.items() if key.startswith("image_proj.")}
    torch.save({f"module.{key}": value for key, value in image_proj.items()}, tmp_path / "resampler.pth")
    projection = backend.denoiser.encoder_hid_proj.image_projection_layers[0]
    equal, differing = describe_equality(load_release_resampler(tmp_path / "resampler.pth"), projection)
    assert equal, differing
    equal, differing = describe_equality(load_release_resampler(GOLDEN / "aligner" / "resampler.pth"), projection)
    assert not equal and "latents" in differing


def test_release_resampler_is_found_only_beside_an_official_aligner(tmp_path):
    from img_core.errors import IncompatibleAlignerError
    from img_core.resampler import find_release_resampler, load_release_resampler

    assert find_release_resampler(GOLDEN / "aligner", "aligner_sdxl.pth") == GOLDEN / "aligner" / "resampler.pth"
    assert find_release_resampler(GOLDEN / "aligner", None) is None  # a save_pretrained aligner folder
    assert find_release_resampler(tmp_path, "aligner_sdxl.pth") is None
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "resampler.pth")
    with pytest.raises(IncompatibleAlignerError, match="not a Resampler"):
        load_release_resampler(tmp_path / "resampler.pth")
