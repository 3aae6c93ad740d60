"""SDXL and SDXL-DPO with IP-Adapter plus (ViT-H): REFERENCE §3-§4.

Image features = image_proj(CLIP ViT-H hidden_states[-2]) -> (1, 16, 2048). The unconditional tokens
are image_proj(CLIP(zero pixel tensor)), the convention diffusers uses for its own negatives. SDXL-DPO
is the same pipeline with the DPO UNet swapped in (`preset.unet_id`).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from img_core.aligner import SDXL_FEATURES
from img_core.backends.base import DiffusionBackend
from img_core.hub import call_or_explain, from_pretrained_or_explain


class SDXLBackend(DiffusionBackend):
    family = "sdxl"
    feature_kind = SDXL_FEATURES

    @classmethod
    def _load_pipeline(cls, preset, dtype: torch.dtype, pipeline_kwargs: dict):
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        if preset.variant and dtype == torch.float16:
            pipeline_kwargs["variant"] = preset.variant
        if preset.unet_id:
            pipeline_kwargs["unet"] = from_pretrained_or_explain(
                UNet2DConditionModel, preset.unet_id, subfolder="unet", dtype=dtype
            )
        pipeline = from_pretrained_or_explain(StableDiffusionXLPipeline, preset.pipeline_id, **pipeline_kwargs)
        ip = preset.ip_adapter
        call_or_explain(
            ip.repo,
            pipeline.load_ip_adapter,
            ip.repo,
            subfolder=ip.subfolder,
            weight_name=ip.weight_name,
            image_encoder_folder=ip.image_encoder,
        )
        pipeline.image_encoder.to(dtype=dtype)
        return pipeline

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.unet

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        tokenizer = self.pipeline.tokenizer
        return [("CLIP", tokenizer, tokenizer.model_max_length)]

    def _encode_for_projection(self, image: Image.Image | None) -> torch.Tensor:
        encoder = self.pipeline.image_encoder
        if image is None:
            size = encoder.config.image_size
            pixel_values = torch.zeros(1, 3, size, size)  # zeros after normalisation (REFERENCE §3)
        else:
            pixel_values = self.pipeline.feature_extractor(images=image, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
        return encoder(pixel_values, output_hidden_states=True).hidden_states[-2]  # (1, 257, 1280) for ViT-H

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
        # (batch, num_images, Si, D); with CFG diffusers splits negative/positive halves with chunk(2).
        positive = image_features[:, None]
        embeds = torch.cat([negative_features[:, None], positive]) if guidance_scale > 1 else positive
        result = self.pipeline(
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            generator=generator,
            ip_adapter_image_embeds=[embeds],
        )
        return result.images[0]
