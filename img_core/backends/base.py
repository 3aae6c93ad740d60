"""The one small interface every diffusion backend offers, and the logic they share.

A backend owns one diffusers pipeline with its IP-Adapter loaded and can:
  * `generate`     - the plain text-to-image result (IP scale 0: the IP-Adapter has no influence);
  * `image_features` - post-projection IP-Adapter tokens of any image, (1, Si, D) float32 on CPU;
  * `regenerate`   - the same prompt and seed again, conditioned on given image tokens at an IP scale.

IMG's aligned tokens are post-projection, while diffusers projects `ip_adapter_image_embeds` itself
(REFERENCE §3). So every call that passes tokens swaps the pipeline's image projection for an identity
for the duration of the call (`projection_bypassed`), instead of projecting twice.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from img_core.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass
class PromptCheck:
    """A validated prompt and the warnings to show the user about it."""

    prompt: str
    warnings: list[str] = field(default_factory=list)


DIFFUSION_QUANTIZATIONS = ("none", "bnb-nf4", "bnb-8bit")


def pipeline_quantization_config(quantization: str, components: tuple[str, ...], device: torch.device, dtype: torch.dtype):
    """diffusers' PipelineQuantizationConfig for the big components of a pipeline, or None for "none".

    bitsandbytes quantization of diffusers models needs a CUDA GPU (diffusers refuses it otherwise)."""
    if quantization not in DIFFUSION_QUANTIZATIONS:
        raise InvalidInputError(f"diffusion quantization must be one of {DIFFUSION_QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none" or not components:
        return None
    if device.type != "cuda":
        raise InvalidInputError(
            f"diffusion quantization {quantization!r} needs a CUDA GPU (bitsandbytes); use --diffusion-quantization none on {device.type}"
        )
    from diffusers.quantizers import PipelineQuantizationConfig

    if quantization == "bnb-nf4":
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
        return PipelineQuantizationConfig("bitsandbytes_4bit", kwargs, list(components))
    return PipelineQuantizationConfig("bitsandbytes_8bit", {"load_in_8bit": True}, list(components))


def require_prompt(prompt) -> str:
    """The stripped prompt; InvalidInputError when it is missing or blank."""
    if prompt is None or not str(prompt).strip():
        raise InvalidInputError("the prompt is empty: describe the image you want")
    return str(prompt).strip()


class DiffusionBackend(ABC):
    family: str = ""
    feature_kind: str = ""

    def __init__(self, pipeline, preset, device: torch.device, dtype: torch.dtype):
        self.pipeline = pipeline
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self._negative_features: torch.Tensor | None = None

    # ------------------------------------------------------------------ what each family provides

    @classmethod
    def load(
        cls, preset, device: torch.device, dtype: torch.dtype, offload: bool = False, quantization: str = "none"
    ) -> "DiffusionBackend":
        """Load the pipeline and its IP-Adapter once; `quantization` applies to `preset.quantize_components`."""
        pipeline_kwargs: dict = {"dtype": dtype}
        quantization_config = pipeline_quantization_config(quantization, preset.quantize_components, device, dtype)
        if quantization_config is not None:
            pipeline_kwargs["quantization_config"] = quantization_config
        pipeline = cls._load_pipeline(preset, dtype, pipeline_kwargs)
        if offload:
            pipeline.enable_model_cpu_offload(device=device)  # after load_ip_adapter (REFERENCE §9)
        else:
            pipeline.to(device)
        return cls(pipeline, preset, device, dtype)

    @classmethod
    @abstractmethod
    def _load_pipeline(cls, preset, dtype: torch.dtype, pipeline_kwargs: dict):
        """The family's diffusers pipeline from `preset`, with its IP-Adapter (and image encoder) loaded."""

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The UNet or transformer that owns `encoder_hid_proj`."""

    @abstractmethod
    def _encode_for_projection(self, image: Image.Image | None) -> torch.Tensor:
        """CLIP output that the IP-Adapter projection takes; None = the unconditional (negative) input."""

    @abstractmethod
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
        """Run the pipeline with post-projection tokens (projection already bypassed)."""

    @abstractmethod
    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        """(encoder name, tokenizer, max tokens) for each text encoder, to report truncation."""

    # ------------------------------------------------------------------ shared behaviour

    @property
    def num_image_tokens(self) -> int:
        return self.image_features_shape()[0]

    @property
    def feature_dim(self) -> int:
        return self.image_features_shape()[1]

    def image_features_shape(self) -> tuple[int, int]:
        return tuple(self.negative_features().shape[1:])  # type: ignore[return-value]

    def check_prompt(self, prompt: str) -> PromptCheck:
        """Reject empty prompts; warn (do not fail) when a text encoder will truncate the prompt."""
        prompt = require_prompt(prompt)
        check = PromptCheck(prompt)
        for name, tokenizer, limit in self.prompt_token_limits():
            count = len(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)
            if count > limit:
                message = (
                    f"the prompt is {count} tokens but the {name} text encoder takes {limit}: "
                    f"the last {count - limit} tokens are cut"
                )
                logger.warning(message)
                check.warnings.append(message)
        return check

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """Post-projection IP-Adapter tokens of `image`: (1, Si, D) float32 on CPU."""
        return self._project(self._encode_for_projection(image))

    def negative_features(self) -> torch.Tensor:
        """Unconditional image tokens (REFERENCE §3), computed once: (1, Si, D) float32 on CPU."""
        if self._negative_features is None:
            with torch.no_grad():
                self._negative_features = self._project(self._encode_for_projection(None))
        return self._negative_features

    def _project(self, encoded: torch.Tensor) -> torch.Tensor:
        projection = self.denoiser.encoder_hid_proj.image_projection_layers[0]
        weight = next(projection.parameters())
        features = projection(encoded.to(device=weight.device, dtype=weight.dtype))
        return features.float().cpu()

    def generate(
        self, prompt: str, seed: int, steps: int, guidance_scale: float, width: int, height: int
    ) -> Image.Image:
        """The base model's own image: IP scale 0 makes the IP-Adapter attention contribute nothing."""
        negative = self.negative_features()
        return self._generate_with_tokens(prompt, seed, steps, guidance_scale, width, height, negative, negative, 0.0)

    def regenerate(
        self,
        prompt: str,
        seed: int,
        image_features: torch.Tensor,
        ip_scale: float,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
    ) -> Image.Image:
        """Re-generate with `image_features` (1, Si, D) as the IP-Adapter image prompt at `ip_scale`."""
        expected = self.image_features_shape()
        if tuple(image_features.shape[-2:]) != expected:
            raise InvalidInputError(
                f"image features of shape {tuple(image_features.shape)} do not fit the {self.family} "
                f"IP-Adapter, which takes (1, {expected[0]}, {expected[1]})"
            )
        return self._generate_with_tokens(
            prompt, seed, steps, guidance_scale, width, height, image_features, self.negative_features(), ip_scale
        )

    def _generate_with_tokens(
        self,
        prompt: str,
        seed: int,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        image_features: torch.Tensor,
        negative_features: torch.Tensor,
        ip_scale: float,
    ) -> Image.Image:
        if steps < 1:
            raise InvalidInputError(f"steps must be at least 1, got {steps}")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.pipeline.set_ip_adapter_scale(float(ip_scale))
        with self.projection_bypassed():
            return self._call_pipeline(
                prompt,
                generator,
                steps,
                guidance_scale,
                width,
                height,
                image_features.to(dtype=self.dtype),
                negative_features.to(dtype=self.dtype),
            )

    @contextlib.contextmanager
    def projection_bypassed(self) -> Iterator[None]:
        """Make the denoiser take post-projection tokens as they are, for the duration of a call."""
        layers = self.denoiser.encoder_hid_proj.image_projection_layers
        projection = layers[0]
        layers[0] = nn.Identity()
        try:
            yield
        finally:
            layers[0] = projection
