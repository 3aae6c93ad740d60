"""FLUX.1-dev sampling the way the authors' release does it, on a loaded diffusers `FluxPipeline`.

The release (`demo_flux.py` with its x-flux `sampling.py` / `xflux_pipeline.py`, REFERENCE §4) differs
from diffusers' `FluxPipeline.__call__` in two ways that change the images the released aligner saw:

  * True classifier-free guidance (a second transformer pass with the empty negative prompt and the
    negative IP tokens, combined as `neg + scale * (pos - neg)`) at scale 3.5, starting at the SECOND step
    (`timestep_to_start_cfg=1`); diffusers starts it at step 0. The first step runs the positive pass only.
  * The sigma schedule's time shift `mu` is computed from `(W//8)*(H//8)//256` (x-flux's rule: 64 at
    1024x1024, mu ~0.47) instead of the packed token count (4096, mu 1.15 in diffusers).

Everything else is diffusers' own code: `encode_prompt`, `prepare_latents` (and its packing),
`prepare_ip_adapter_image_embeds`, `retrieve_timesteps` with `sigmas`/`mu`, the scheduler's Euler step,
`_unpack_latents` and the VAE decode. With `true_cfg_scale=1` and `schedule="diffusers"` the result
equals `FluxPipeline(...)` for the same inputs (tested). Noise layout (x-flux's `get_noise` vs diffusers'
latents) is a random-number detail and stays diffusers'.

Cost: every step with true CFG runs the transformer twice. The release's setting (3.5 from step 1, 30
steps) makes 59 transformer passes instead of 30: ~1.97x the time of standard FLUX.1-dev sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

SCHEDULES = ("release", "diffusers")  # how the time shift mu is computed (see `schedule_mu`)


def schedule_mu(scheduler_config, width: int, height: int, vae_scale_factor: int, schedule: str) -> float:
    """The time shift mu of FLUX's sigma schedule for an image of `width` x `height` pixels.

    "diffusers": from the packed token count ((H/f/2) * (W/f/2), 4096 at 1024 px), as `FluxPipeline`.
    "release": from `(W//f)*(H//f)//256` (64 at 1024 px), as x-flux's `get_schedule` is called by the
    release (f = 8, the VAE's factor). Both go through the same linear rule (`calculate_shift`)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    latent_height, latent_width = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    if schedule == "release":
        sequence_length = (width // vae_scale_factor) * (height // vae_scale_factor) // 256  # x-flux's rule
    else:
        sequence_length = (latent_height // 2) * (latent_width // 2)  # packed token count
    return calculate_shift(
        sequence_length,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def flux_sigmas(scheduler, steps: int, width: int, height: int, vae_scale_factor: int, schedule: str) -> torch.Tensor:
    """The `steps + 1` sigmas (ending in 0) a FLUX run takes, computed on a copy of `scheduler` (no model)."""
    scheduler = scheduler.__class__.from_config(scheduler.config)
    set_flux_timesteps(scheduler, steps, schedule_mu(scheduler.config, width, height, vae_scale_factor, schedule), "cpu")
    return scheduler.sigmas


def set_flux_timesteps(scheduler, steps: int, mu: float, device) -> torch.Tensor:
    """diffusers' FLUX spacing (sigmas linspace(1, 1/steps), shifted by mu, then 0) set on `scheduler`."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return timesteps


def _set_ip_scale(pipeline, scale: float | None) -> None:
    if scale is not None and getattr(pipeline.transformer, "encoder_hid_proj", None) is not None:
        pipeline.set_ip_adapter_scale(float(scale))


@torch.no_grad()
def sample_flux(
    pipeline,
    *,
    prompt: str | None = None,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_prompt: str = "",
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ip_scale: float | None = None,
    negative_ip_scale: float | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 3.5,
    true_cfg_scale: float = 3.5,
    cfg_start_step: int = 1,
    schedule: str = "release",
    width: int = 1024,
    height: int = 1024,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    max_sequence_length: int = 512,
    on_step: Callable[[int, int], None] | None = None,  # (steps done, steps in all)
    output_type: str = "pil",
) -> list[Image.Image] | torch.Tensor:
    """Sample FLUX images with optional true CFG from `cfg_start_step` on; defaults = the release.

    Text: `prompt` or precomputed `prompt_embeds` + `pooled_prompt_embeds` (as `pipeline.encode_prompt`
    returns them); the negative side likewise (`negative_prompt` defaults to the release's ""), encoded only
    when true CFG is on. IP tokens: lists as `FluxPipeline` takes them, one tensor (B, num_images, Si, D)
    per IP-Adapter; when true CFG is on and IP tokens are given, the negative tokens are required.
    `ip_scale` / `negative_ip_scale` set the IP-Adapter scale of the positive / negative pass (None: leave
    the processors' scale as set; negative None: same as positive, as the release uses them).
    `true_cfg_scale` <= 1 turns true CFG off (one pass per step). `schedule`: "release" or "diffusers"
    (`schedule_mu`). Returns the images (`output_type` "pil" or "np", as diffusers) or, for "latent",
    the packed latents (B, tokens, C)."""
    # 1. check inputs
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if cfg_start_step < 0:
        raise ValueError(f"cfg_start_step must be >= 0, got {cfg_start_step}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if prompt_embeds is None and prompt is None:
        raise ValueError("pass `prompt` or `prompt_embeds` with `pooled_prompt_embeds`")
    if (prompt_embeds is None) != (pooled_prompt_embeds is None):
        raise ValueError("pass `prompt_embeds` and `pooled_prompt_embeds` together")
    if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
        raise ValueError("pass `negative_prompt_embeds` and `negative_pooled_prompt_embeds` together")
    do_true_cfg = true_cfg_scale > 1
    if do_true_cfg and ip_adapter_image_embeds is not None and negative_ip_adapter_image_embeds is None:
        raise ValueError("true CFG with IP tokens needs `negative_ip_adapter_image_embeds` (the release: a black image's)")
    if negative_ip_scale is not None and ip_scale is None:
        raise ValueError("`negative_ip_scale` needs `ip_scale` too")
    negative_ip_scale = ip_scale if negative_ip_scale is None else negative_ip_scale
    device = pipeline._execution_device

    # 2. encode the prompts (embeddings given by the caller, e.g. cached per prompt, are used as they are)
    prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
        prompt=prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        device=device, max_sequence_length=max_sequence_length,
    )
    prompt_embeds, pooled_prompt_embeds = prompt_embeds.to(device), pooled_prompt_embeds.to(device)
    if do_true_cfg:
        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = pipeline.encode_prompt(
            prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, max_sequence_length=max_sequence_length,
        )
        negative_prompt_embeds = negative_prompt_embeds.to(device)
        negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device)
    batch_size = prompt_embeds.shape[0]

    # 3. initial noise, packed into (B, tokens, 4 * C)
    num_channels_latents = pipeline.transformer.config.in_channels // 4
    latents, latent_image_ids = pipeline.prepare_latents(
        batch_size, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents
    )

    # 4. sigmas: diffusers' spacing with the chosen time shift mu
    mu = schedule_mu(pipeline.scheduler.config, width, height, pipeline.vae_scale_factor, schedule)
    timesteps = set_flux_timesteps(pipeline.scheduler, num_inference_steps, mu, device)
    guidance = None
    if pipeline.transformer.config.guidance_embeds:  # FLUX.1-dev's distilled guidance
        guidance = torch.full([batch_size], guidance_scale, device=device, dtype=torch.float32)

    image_embeds = negative_image_embeds = None
    if ip_adapter_image_embeds is not None:
        image_embeds = pipeline.prepare_ip_adapter_image_embeds(None, ip_adapter_image_embeds, device, batch_size)
    if negative_ip_adapter_image_embeds is not None:
        negative_image_embeds = pipeline.prepare_ip_adapter_image_embeds(
            None, negative_ip_adapter_image_embeds, device, batch_size
        )

    def predict(latents, timestep, embeds, pooled, ids, ip_embeds, cache_name) -> torch.Tensor:
        # The transformer pops the IP tokens out of this dict, so each pass gets a fresh one.
        attention_kwargs = {"ip_adapter_image_embeds": ip_embeds} if ip_embeds is not None else {}
        with pipeline.transformer.cache_context(cache_name):
            return pipeline.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=ids,
                img_ids=latent_image_ids,
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

    # 5. denoising loop: true CFG only from `cfg_start_step` on (release: 1)
    _set_ip_scale(pipeline, ip_scale)
    pipeline.scheduler.set_begin_index(0)
    with pipeline.progress_bar(total=num_inference_steps) as progress_bar:
        for i, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = predict(latents, timestep, prompt_embeds, pooled_prompt_embeds, text_ids, image_embeds, "cond")
            if do_true_cfg and i >= cfg_start_step:
                if negative_ip_scale != ip_scale:
                    _set_ip_scale(pipeline, negative_ip_scale)
                negative_pred = predict(
                    latents, timestep, negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids,
                    negative_image_embeds, "uncond",
                )
                if negative_ip_scale != ip_scale:
                    _set_ip_scale(pipeline, ip_scale)
                noise_pred = negative_pred + true_cfg_scale * (noise_pred - negative_pred)
            latents = pipeline.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, num_inference_steps)
            progress_bar.update()

    # 6. decode
    if output_type == "latent":
        pipeline.maybe_free_model_hooks()
        return latents
    from diffusers.utils.torch_utils import get_module_execution_device

    latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    latents = (latents / pipeline.vae.config.scaling_factor) + pipeline.vae.config.shift_factor
    latents = latents.to(get_module_execution_device(pipeline.vae))
    image = pipeline.vae.decode(latents, return_dict=False)[0]
    images = pipeline.image_processor.postprocess(image, output_type=output_type)
    pipeline.maybe_free_model_hooks()
    return images
