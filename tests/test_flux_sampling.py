"""The release's FLUX sampling (true CFG from step 1, x-flux's schedule) on the tiny FLUX pipeline:
equal to diffusers' FluxPipeline when both options are off, CFG starting exactly at the second step,
the release's sigmas at 1024x1024 computed without a model, the 2x transformer passes, and equal to the
release's own x-flux sampler on the tiny weights of tests/golden/flux_sampling (tools/make_golden_flux.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from safetensors.torch import load_file

from img_core.backends.flux_sampling import flux_sigmas, sample_flux, schedule_mu
from img_core.presets import FLUX_SAMPLINGS, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cube on a blue sphere"
STEPS = 3

GOLDEN = Path(__file__).parent / "golden" / "flux_sampling"

# FLUX.1-dev's scheduler/scheduler_config.json (the values REFERENCE §4 reasons with).
FLUX_DEV_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True
)


@pytest.fixture(scope="module")
def flux(tiny_flux_session):
    """The tiny FLUX backend, its pipeline, and post-projection IP tokens (positive and black-image)."""
    backend = tiny_flux_session.backend
    positive = torch.randn((1,) + tuple(backend.negative_features().shape[1:]), generator=torch.Generator().manual_seed(3))
    return backend, backend.pipeline, positive, backend.negative_features()


def run(flux, steps=STEPS, ip_scale=0.5, seed=0, **options):
    """Our sampler on the tiny pipeline with post-projection tokens (projection bypassed), latents out."""
    backend, pipeline, positive, negative = flux
    defaults = dict(true_cfg_scale=1.0, cfg_start_step=0, schedule="diffusers")
    defaults.update(options)
    with backend.projection_bypassed():
        return sample_flux(
            pipeline,
            prompt=PROMPT,
            ip_adapter_image_embeds=[positive[:, None]],
            negative_ip_adapter_image_embeds=[negative[:, None]],
            ip_scale=ip_scale,
            num_inference_steps=steps,
            guidance_scale=3.5,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(seed),
            max_sequence_length=32,
            output_type="latent",
            **defaults,
        )


def count_transformer_passes(pipeline, action) -> int:
    calls = []
    handle = pipeline.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        action()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.5])
def test_equals_diffusers_pipeline_with_its_schedule_and_cfg_from_step_0(flux, true_cfg_scale):
    backend, pipeline, positive, negative = flux
    common = dict(
        num_inference_steps=STEPS, guidance_scale=3.5, width=64, height=64, max_sequence_length=32,
        ip_adapter_image_embeds=[positive[:, None]], negative_ip_adapter_image_embeds=[negative[:, None]],
        true_cfg_scale=true_cfg_scale,
    )
    pipeline.set_ip_adapter_scale(0.5)
    with backend.projection_bypassed():
        expected = pipeline(
            prompt=PROMPT, negative_prompt="" if true_cfg_scale > 1 else None, output_type="np",
            generator=torch.Generator().manual_seed(0), **common,
        ).images[0]
        ours = sample_flux(
            pipeline, prompt=PROMPT, cfg_start_step=0, schedule="diffusers", ip_scale=0.5, output_type="np",
            generator=torch.Generator().manual_seed(0), **common,
        )[0]
    assert ours.shape == expected.shape == (64, 64, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_cfg_from_step_1_changes_nothing_in_the_first_step(flux):
    off = run(flux, steps=1)
    from_step_1 = run(flux, steps=1, true_cfg_scale=3.5, cfg_start_step=1)
    from_step_0 = run(flux, steps=1, true_cfg_scale=3.5, cfg_start_step=0)
    torch.testing.assert_close(from_step_1, off, rtol=0, atol=0)
    assert (from_step_0 - off).abs().max() > 1e-3


def test_cfg_from_step_1_guides_the_later_steps(flux):
    off = run(flux)
    from_step_1 = run(flux, true_cfg_scale=3.5, cfg_start_step=1)
    from_step_0 = run(flux, true_cfg_scale=3.5, cfg_start_step=0)
    assert (from_step_1 - off).abs().max() > 1e-3
    assert (from_step_1 - from_step_0).abs().max() > 1e-3


def test_true_cfg_costs_one_extra_pass_per_guided_step(flux):
    pipeline = flux[1]
    assert count_transformer_passes(pipeline, lambda: run(flux)) == STEPS
    assert count_transformer_passes(pipeline, lambda: run(flux, true_cfg_scale=3.5, cfg_start_step=0)) == 2 * STEPS
    assert count_transformer_passes(pipeline, lambda: run(flux, true_cfg_scale=3.5, cfg_start_step=1)) == 2 * STEPS - 1


def test_negative_ip_scale_steers_only_the_negative_pass(flux):
    same = run(flux, true_cfg_scale=3.5, cfg_start_step=1, ip_scale=0.5)
    explicit = run(flux, true_cfg_scale=3.5, cfg_start_step=1, ip_scale=0.5, negative_ip_scale=0.5)
    other = run(flux, true_cfg_scale=3.5, cfg_start_step=1, ip_scale=0.5, negative_ip_scale=0.0)
    torch.testing.assert_close(explicit, same, rtol=0, atol=0)
    assert (other - same).abs().max() > 1e-4
    # without true CFG the negative pass does not run, so its scale cannot matter
    torch.testing.assert_close(run(flux, negative_ip_scale=0.0), run(flux), rtol=0, atol=0)
    processors = [p for p in flux[1].transformer.attn_processors.values() if hasattr(p, "scale")]
    assert processors and all(p.scale == [0.5] for p in processors)  # left as the caller set it


def test_release_schedule_changes_the_image(flux):
    assert (run(flux, schedule="release") - run(flux, schedule="diffusers")).abs().max() > 1e-4


def test_release_mu_and_sigmas_at_1024px():
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    release_mu = schedule_mu(scheduler.config, 1024, 1024, 8, "release")
    diffusers_mu = schedule_mu(scheduler.config, 1024, 1024, 8, "diffusers")
    assert release_mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256))  # 0.4675
    assert diffusers_mu == pytest.approx(1.15)

    release = flux_sigmas(scheduler, 30, 1024, 1024, 8, "release")
    diffusers_sigmas = flux_sigmas(scheduler, 30, 1024, 1024, 8, "diffusers")
    # x-flux's get_schedule: time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1) over linspace(1, 0, steps + 1)
    t = np.linspace(1.0, 0.0, 31)[:-1]
    expected = np.append(math.exp(release_mu) / (math.exp(release_mu) + 1 / t - 1), 0.0)
    assert release.shape == (31,)
    np.testing.assert_allclose(release.numpy(), expected, atol=1e-6)
    gap = (diffusers_sigmas - release).abs().max().item()
    assert 0.16 < gap < 0.18  # REFERENCE §4: "differ by up to ~0.17 at 1024 px"
    assert scheduler.sigmas.shape != release.shape or not torch.equal(scheduler.sigmas, release)  # a copy was used


def test_presets_default_to_the_release_sampling():
    release = FLUX_SAMPLINGS["release"]
    assert (release.true_cfg_scale, release.true_cfg_start_step, release.sigma_schedule) == (3.5, 1, "release")
    assert PRESETS["flux-dev"].flux_sampling == release
    assert PRESETS["flux-dev"].true_cfg_scale == 3.5
    assert FLUX_SAMPLINGS["fast"].true_cfg_scale == 1.0
    tiny = PRESETS["tiny-flux"].flux_sampling
    assert tiny.true_cfg_scale > 1 and tiny.true_cfg_start_step == 1  # tests run the release's code path


def test_bad_options_are_rejected(flux):
    with pytest.raises(ValueError, match="schedule"):
        run(flux, schedule="karras")
    with pytest.raises(ValueError, match="cfg_start_step"):
        run(flux, cfg_start_step=-1)
    with pytest.raises(ValueError, match="negative_ip_adapter_image_embeds"):
        sample_flux(flux[1], prompt=PROMPT, ip_adapter_image_embeds=[flux[2][:, None]], true_cfg_scale=3.5)


@pytest.fixture(scope="module")
def golden_pipeline():
    """A FluxPipeline of the golden tiny transformer + XLabs IP-Adapter (no VAE: the golden is latents)."""
    transformer = FluxTransformer2DModel.from_pretrained(GOLDEN / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )
    pipeline.load_ip_adapter(str(GOLDEN), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    pipeline.transformer.encoder_hid_proj.image_projection_layers[0] = torch.nn.Identity()  # tokens are post-projection
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("round_name, tokens, ip_scale", [("round0", "black_tokens", 0.0), ("regenerated", "aligned_tokens", 0.2)])
def test_equals_the_release_x_flux_sampler(golden_pipeline, round_name, tokens, ip_scale):
    golden = load_file(GOLDEN / "golden.safetensors")
    recipe = json.loads((GOLDEN / "recipe.json").read_text())
    assert recipe["timestep_to_start_cfg"] == 1 and recipe["true_gs"] == 3.5

    def ours(**options):
        settings = dict(true_cfg_scale=3.5, cfg_start_step=1, schedule="release")
        settings.update(options)
        return sample_flux(
            golden_pipeline,
            prompt_embeds=golden["prompt_embeds"],
            pooled_prompt_embeds=golden["pooled_prompt_embeds"],
            negative_prompt_embeds=golden["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=golden["negative_pooled_prompt_embeds"],
            ip_adapter_image_embeds=[golden[tokens][:, None]],
            negative_ip_adapter_image_embeds=[golden["black_tokens"][:, None]],
            ip_scale=ip_scale,
            num_inference_steps=recipe["steps"],
            guidance_scale=recipe["guidance"],
            width=recipe["width"],
            height=recipe["height"],
            latents=golden["packed_noise"],
            output_type="latent",
            **settings,
        )

    expected = golden[f"{round_name}_latents"]
    sigmas = flux_sigmas(golden_pipeline.scheduler, recipe["steps"], recipe["width"], recipe["height"], 8, "release")
    np.testing.assert_allclose(sigmas.double().numpy(), golden["timesteps"].numpy(), atol=1e-6)
    torch.testing.assert_close(ours(), expected, rtol=1e-4, atol=1e-4)
    # diffusers' CFG start or schedule would not match the release
    assert (ours(cfg_start_step=0) - expected).abs().max() > 1e-2
    assert (ours(schedule="diffusers") - expected).abs().max() > 1e-2
