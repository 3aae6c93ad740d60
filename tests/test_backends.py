"""Diffusion backends on the tiny stacks: the IP-Adapter path must not disturb the base model's image,
and aligned tokens must reach the re-generation (REFERENCE §3-§4)."""

import numpy as np
import pytest
import torch

from img_core.backends import backend_class
from img_core.backends.base import DiffusionCall
from img_core.errors import InvalidInputError
from img_core.presets import get_preset

PROMPT = "A green banana and a brown horse."


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-flux"])
def backend(request, tiny_root):
    preset = get_preset(request.param).resolved(tiny_root)
    loaded = backend_class(preset.family).load(preset, torch.device("cpu"), torch.float32)
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded


def plain_pipeline(preset):
    """The stock diffusers pipeline of the same weights, with no IP-Adapter loaded."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if preset.family == "flux":
        pipeline = FluxPipeline.from_pretrained(preset.pipeline_id)
    else:
        kwargs = {}
        if preset.unet_id:
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(preset.unet_id, subfolder="unet")
        pipeline = StableDiffusionXLPipeline.from_pretrained(preset.pipeline_id, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_kwargs(preset, seed=0, steps=3):
    return dict(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=preset.default_guidance_scale,
        width=preset.width,
        height=preset.height,
        generator=torch.Generator().manual_seed(seed),
    )


def reference_image(preset, seed=0, steps=3):
    """The base model's image from the stock pipeline: SDXL's own __call__; FLUX sampled the preset's way
    (the release's true CFG from step 1 and sigma schedule) with `sample_flux` on a pipeline without IP-Adapter."""
    pipeline = plain_pipeline(preset)
    if preset.family == "sdxl":
        return pipeline(**generate_kwargs(preset, seed, steps)).images[0]
    from img_core.backends.flux_sampling import sample_flux

    sampling = preset.flux_sampling
    return sample_flux(
        pipeline, true_cfg_scale=sampling.true_cfg_scale, cfg_start_step=sampling.true_cfg_start_step,
        schedule=sampling.sigma_schedule, **generate_kwargs(preset, seed, steps),
    )[0]  # fmt: skip


def call(preset, seed=0, steps=3, ip_scale=0.0, **overrides) -> DiffusionCall:
    values = dict(prompt=PROMPT, seed=seed, steps=steps, guidance_scale=preset.default_guidance_scale,
                  width=preset.width, height=preset.height, ip_scale=ip_scale)  # fmt: skip
    return DiffusionCall(**{**values, **overrides})


def test_initial_image_equals_plain_pipeline(backend):
    preset = backend.preset
    ours = backend.generate(call(preset))
    reference = reference_image(preset)
    assert ours.size == (preset.width, preset.height)
    assert np.array_equal(pixels(ours), pixels(reference))


def test_ip_scale_zero_regeneration_equals_plain_pipeline_and_aligned_tokens_change_it(backend):
    preset = backend.preset
    initial = backend.generate(call(preset))
    features = backend.image_features(initial)
    at_zero = backend.regenerate(call(preset, ip_scale=0.0), features * 3.0)
    assert np.array_equal(pixels(at_zero), pixels(initial))
    with_features = backend.regenerate(call(preset, ip_scale=0.2), features)
    shifted = backend.regenerate(call(preset, ip_scale=0.2), features + 1.0)
    assert np.abs(pixels(with_features) - pixels(initial)).mean() > 0.5
    assert np.abs(pixels(shifted) - pixels(with_features)).mean() > 0.5
    # Deterministic: same tokens and seed give the same image.
    assert np.array_equal(pixels(backend.regenerate(call(preset, ip_scale=0.2), features)), pixels(with_features))


def test_image_features_are_post_projection_tokens(backend):
    preset = backend.preset
    expected_tokens = 16 if preset.family == "sdxl" else 4
    image = backend.generate(call(preset, seed=1, steps=2))
    features = backend.image_features(image)
    projection = backend.denoiser.encoder_hid_proj.image_projection_layers[0]
    assert features.shape == (1, expected_tokens, backend.feature_dim)
    assert features.dtype == torch.float32
    # Same as running diffusers' own projection on the CLIP output by hand.
    with torch.no_grad():
        by_hand = projection(backend._encode_for_projection(image))
    torch.testing.assert_close(features, by_hand)
    # The projection is restored after a call that bypassed it.
    backend.regenerate(call(preset, steps=1, ip_scale=0.2), features)
    assert backend.denoiser.encoder_hid_proj.image_projection_layers[0] is projection
    # Different images give different tokens; the negative tokens differ from both.
    other = backend.image_features(image.transpose(0))
    assert (other - features).abs().max() > 1e-4
    assert (backend.negative_features() - features).abs().max() > 1e-4


def test_wrong_feature_shape_and_empty_prompt_are_rejected(backend):
    preset = backend.preset
    with pytest.raises(InvalidInputError, match="do not fit"):
        backend.regenerate(call(preset, steps=1, ip_scale=0.2), torch.zeros(1, 3, 7))
    for prompt in ("", "   ", None):
        with pytest.raises(InvalidInputError, match="prompt is empty"):
            backend.check_prompt(prompt)


def test_long_prompt_is_truncated_with_a_warning_saying_how_much(backend, caplog):
    long_prompt = " ".join(["fox"] * 480)  # under the 2000-character cap, over every text encoder's limit
    with caplog.at_level("WARNING"):
        check = backend.check_prompt(long_prompt)
    assert len(check.warnings) == 1
    assert "tokens are cut" in check.warnings[0] and "tokens are cut" in caplog.text
    limit = int(check.warnings[0].split("takes ")[1].split(":")[0])
    count = int(check.warnings[0].split("prompt is ")[1].split(" ")[0])
    cut = int(check.warnings[0].split("the last ")[1].split(" ")[0])
    assert count - limit == cut > 0
    assert backend.check_prompt(PROMPT).warnings == ()


def test_sdxl_dpo_swaps_the_unet(tiny_root):
    base = get_preset("tiny-sdxl").resolved(tiny_root)
    dpo = get_preset("tiny-sdxl-dpo").resolved(tiny_root)
    dpo_backend = backend_class("sdxl").load(dpo, torch.device("cpu"), torch.float32)
    dpo_backend.pipeline.set_progress_bar_config(disable=True)
    dpo_image = dpo_backend.generate(call(dpo, steps=2))
    assert np.array_equal(pixels(dpo_image), pixels(plain_pipeline(dpo)(**generate_kwargs(dpo, steps=2)).images[0]))
    base_image = plain_pipeline(base)(**generate_kwargs(base, steps=2)).images[0]
    assert np.abs(pixels(dpo_image) - pixels(base_image)).mean() > 0.5


def test_diffusion_quantization_config_targets_the_big_components():
    from img_core.backends.base import pipeline_quantization_config

    flux = get_preset("flux-dev")
    assert flux.diffusion_quantization == "bnb-nf4"
    assert pipeline_quantization_config("none", flux.quantize_components, torch.device("cuda"), torch.bfloat16) is None
    config = pipeline_quantization_config("bnb-nf4", flux.quantize_components, torch.device("cuda"), torch.bfloat16)
    assert config.quant_backend == "bitsandbytes_4bit"
    assert config.components_to_quantize == ["transformer", "text_encoder_2"]
    assert config.quant_kwargs["bnb_4bit_quant_type"] == "nf4"
    with pytest.raises(InvalidInputError, match="needs a CUDA GPU"):
        pipeline_quantization_config("bnb-nf4", flux.quantize_components, torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidInputError, match="must be one of"):
        pipeline_quantization_config("fp3", flux.quantize_components, torch.device("cuda"), torch.float32)


def test_pipeline_is_offloaded_automatically_only_on_small_gpus():
    from img_core.presets import needs_offload

    assert needs_offload(get_preset("flux-dev"), 24.0) and not needs_offload(get_preset("flux-dev"), 80.0)
    assert not needs_offload(get_preset("sdxl"), 24.0) and needs_offload(get_preset("sdxl"), 16.0)
    assert not needs_offload(get_preset("tiny-sdxl"), 1.0)
