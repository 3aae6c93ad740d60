"""FLUX.1-dev with the XLabs IP-Adapter: REFERENCE §3-§4.

Image features = linear projection of CLIP ViT-L/14 `image_embeds` -> (1, 4, 4096). FLUX does not
stack CFG halves: the unconditional tokens go in `negative_ip_adapter_image_embeds` and are always
passed (otherwise diffusers encodes a black image itself). They are the tokens of a black image, the
convention of both the authors' release and diffusers' FluxPipeline. Sampling follows the preset's
`flux_sampling` (`sample_flux`): by default the release's true CFG 3.5 from the second step with an empty
negative prompt and x-flux's sigma schedule (about 2x the cost of plain FLUX.1-dev).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from img_core.aligner import FLUX_FEATURES
from img_core.backends.base import DiffusionBackend, DiffusionCall, StepCallback
from img_core.backends.flux_sampling import sample_flux
from img_core.clip_processing import pil_clip_image_processor
from img_core.hub import call_or_explain, from_pretrained_or_explain

T5_MAX_SEQUENCE_LENGTH = 512


class FluxBackend(DiffusionBackend):
    family = "flux"
    feature_kind = FLUX_FEATURES

    @classmethod
    def _load_pipeline(cls, preset, dtype: torch.dtype, pipeline_kwargs: dict):
        from diffusers import FluxPipeline

        pipeline = from_pretrained_or_explain(FluxPipeline, preset.pipeline_id, **pipeline_kwargs)
        ip = preset.ip_adapter
        call_or_explain(
            ip.repo,
            pipeline.load_ip_adapter,
            ip.repo,
            weight_name=ip.weight_name,
            subfolder=ip.subfolder,
            image_encoder_pretrained_model_name_or_path=ip.image_encoder,
            image_encoder_dtype=dtype,
        )
        # PIL resizing as the release's transformers 4.37 did; torchvision's differs by one 8-bit level.
        pipeline.feature_extractor = pil_clip_image_processor(pipeline.feature_extractor)
        return pipeline

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        tokenizer = self.pipeline.tokenizer_2
        return [("T5", tokenizer, T5_MAX_SEQUENCE_LENGTH)]

    def _encode_for_projection(self, image: Image.Image | None) -> torch.Tensor:
        encoder = self.pipeline.image_encoder
        if image is None:
            image = Image.new("RGB", (self.preset.width, self.preset.height))  # black image
        pixel_values = self.pipeline.feature_extractor(images=image, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
        return encoder(pixel_values).image_embeds  # (1, 768) for ViT-L/14

    def _uses_true_cfg(self) -> bool:
        return self.preset.flux_sampling.true_cfg_scale > 1

    def _prompt_cache_key(self, call: DiffusionCall) -> tuple:
        return (call.prompt, self._uses_true_cfg())

    def _encode_prompt(self, call: DiffusionCall) -> dict[str, torch.Tensor]:
        device = self.pipeline._execution_device
        embeds, pooled, _ = self.pipeline.encode_prompt(
            call.prompt, device=device, max_sequence_length=T5_MAX_SEQUENCE_LENGTH
        )
        embeddings = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self._uses_true_cfg():  # the release's empty negative prompt
            negative, negative_pooled, _ = self.pipeline.encode_prompt(
                "", device=device, max_sequence_length=T5_MAX_SEQUENCE_LENGTH
            )
            embeddings.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return embeddings

    def _call_pipeline(
        self,
        call: DiffusionCall,
        prompt_embeddings: dict[str, torch.Tensor],
        generator: torch.Generator,
        image_features: torch.Tensor,
        negative_features: torch.Tensor,
        on_step: StepCallback | None,
    ) -> Image.Image:
        # The release's sampling (true CFG from the 2nd step, x-flux's sigma schedule) or a faster one: the
        # preset's `flux_sampling`. Negative IP tokens at the positive scale, as the release uses them.
        sampling = self.preset.flux_sampling
        images = sample_flux(
            self.pipeline,
            **prompt_embeddings,
            ip_adapter_image_embeds=[image_features[:, None]],  # (batch, num_images, Si, D)
            negative_ip_adapter_image_embeds=[negative_features[:, None]],
            ip_scale=call.ip_scale,
            num_inference_steps=call.steps,
            guidance_scale=call.guidance_scale,
            true_cfg_scale=sampling.true_cfg_scale,
            cfg_start_step=sampling.true_cfg_start_step,
            schedule=sampling.sigma_schedule,
            width=call.width,
            height=call.height,
            generator=generator,
            max_sequence_length=T5_MAX_SEQUENCE_LENGTH,
            on_step=on_step,
        )
        return images[0]
