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
from img_core.backends.base import DiffusionBackend, DiffusionCall, StepCallback
from img_core.clip_processing import pil_clip_image_processor
from img_core.hub import call_or_explain, from_pretrained_or_explain
from img_core.resampler import project, release_resampler_for


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
        # PIL resizing as the release's transformers 4.37 did; torchvision's differs by one 8-bit level.
        pipeline.feature_extractor = pil_clip_image_processor(pipeline.feature_extractor)
        return pipeline

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.unet

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        tokenizer = self.pipeline.tokenizer
        return [("CLIP", tokenizer, tokenizer.model_max_length)]

    def __init__(self, pipeline, preset, device: torch.device, dtype: torch.dtype):
        super().__init__(pipeline, preset, device, dtype)
        # The release computes the aligner's input tokens with its own `resampler.pth` (REFERENCE §5); None
        # when the aligner comes without one: then the IP-Adapter's projection makes them.
        projection = self.denoiser.encoder_hid_proj.image_projection_layers[0]
        self.release_resampler = release_resampler_for(preset.aligner, projection)

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """Aligner input tokens (1, Si, D): from the release's resampler when there is one, else from the
        IP-Adapter's projection."""
        if self.release_resampler is None:
            return super().image_features(image)
        return project(self.release_resampler, self._encode_for_projection(image))

    def _encode_for_projection(self, image: Image.Image | None) -> torch.Tensor:
        encoder = self.pipeline.image_encoder
        if image is None:
            size = encoder.config.image_size
            pixel_values = torch.zeros(1, 3, size, size)  # zeros after normalisation (REFERENCE §3)
        else:
            pixel_values = self.pipeline.feature_extractor(images=image, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
        return encoder(pixel_values, output_hidden_states=True).hidden_states[-2]  # (1, 257, 1280) for ViT-H

    def _prompt_cache_key(self, call: DiffusionCall) -> tuple:
        return (call.prompt, self._uses_cfg(call))

    def _uses_cfg(self, call: DiffusionCall) -> bool:
        return call.guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None  # as diffusers decides

    def _encode_prompt(self, call: DiffusionCall) -> dict[str, torch.Tensor]:
        # Empty negative prompt: SDXL zeroes it (force_zeros_for_empty_prompt), as the pipeline would.
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            call.prompt, device=self.pipeline._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=self._uses_cfg(call),
        )
        embeddings = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self._uses_cfg(call):
            embeddings.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
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
        # (batch, num_images, Si, D); with CFG diffusers splits negative/positive halves with chunk(2).
        positive = image_features[:, None]
        embeds = torch.cat([negative_features[:, None], positive]) if self._uses_cfg(call) else positive
        result = self.pipeline(
            **prompt_embeddings,
            num_inference_steps=call.steps,
            guidance_scale=call.guidance_scale,
            width=call.width,
            height=call.height,
            generator=generator,
            ip_adapter_image_embeds=[embeds],
            **self.step_reporter(call, on_step),
        )
        return result.images[0]
