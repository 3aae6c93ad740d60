"""FLUX.1-dev with the XLabs IP-Adapter: REFERENCE §3-§4.

Image features = linear projection of CLIP ViT-L/14 `image_embeds` -> (1, 4, 4096). FLUX does not
stack CFG halves: the unconditional tokens go in `negative_ip_adapter_image_embeds` and are always
passed (otherwise diffusers encodes a black image itself). They are the tokens of a black image, the
convention of both the authors' release and diffusers' FluxPipeline. True CFG (`true_cfg_scale` > 1
with an empty negative prompt, as in the release) is an option of the preset; it doubles the cost.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from img_core.aligner import FLUX_FEATURES
from img_core.backends.base import DiffusionBackend
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

    def _call_pipeline(
        self,
        prompt: str,
        generator: torch.Generator,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        image_features: torch.Tensor,
        negative_features: torch.Tensor,
    ) -> Image.Image:
        true_cfg = self.preset.true_cfg_scale
        result = self.pipeline(
            prompt=prompt,
            negative_prompt="" if true_cfg > 1 else None,
            true_cfg_scale=true_cfg,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            generator=generator,
            max_sequence_length=T5_MAX_SEQUENCE_LENGTH,
            ip_adapter_image_embeds=[image_features[:, None]],  # (batch, num_images, Si, D)
            negative_ip_adapter_image_embeds=[negative_features[:, None]],
        )
        return result.images[0]
