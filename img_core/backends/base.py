"""The one small interface every diffusion backend offers, and the logic they share.

A backend owns one diffusers pipeline with its IP-Adapter loaded and can:
  * `generate`     - the plain text-to-image result (IP scale 0: the IP-Adapter has no influence);
  * `image_features` - post-projection IP-Adapter tokens of any image, (1, Si, D) float32 on CPU;
  * `regenerate`   - the same prompt and seed again, conditioned on given image tokens at an IP scale.

IMG's aligned tokens are post-projection, while diffusers projects `ip_adapter_image_embeds` itself
(REFERENCE §3). So every call that passes tokens swaps the pipeline's image projection for an identity
for the duration of the call (`projection_bypassed`), instead of projecting twice.

Text embeddings are encoded once per prompt and passed to the pipeline (`prompt_embeddings`): rounds of
one prompt do not run the text encoders again. The images are the same as letting the pipeline encode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from img_core.errors import InvalidInputError
from img_core.settings import DIFFUSION_QUANTIZATIONS, CheckedPrompt, check_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionCall:
    """One pipeline call: what `generate` and `regenerate` take instead of positional numbers."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    ip_scale: float = 0.0  # 0: the IP-Adapter contributes nothing (round 0)


StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
PROMPT_CACHE_SIZE = 4  # prompts whose text embeddings a backend keeps (rounds of one prompt reuse them)


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


class DiffusionBackend(ABC):
    family: str = ""
    feature_kind: str = ""

    def __init__(self, pipeline, preset, device: torch.device, dtype: torch.dtype):
        self.pipeline = pipeline
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self._negative_features: torch.Tensor | None = None
        # Text embeddings per (prompt, call options): rounds of one prompt encode it once (LRU, bounded).
        self._prompt_embeddings: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

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
    def _encode_prompt(self, call: DiffusionCall) -> dict[str, torch.Tensor]:
        """The pipeline's text-embedding keyword arguments (`prompt_embeds=`, ...) for `call`."""

    @abstractmethod
    def _prompt_cache_key(self, call: DiffusionCall) -> tuple:
        """What the text embeddings of `call` depend on."""

    @abstractmethod
    def _call_pipeline(
        self,
        call: DiffusionCall,
        prompt_embeddings: dict[str, torch.Tensor],
        generator: torch.Generator,
        image_features: torch.Tensor,
        negative_features: torch.Tensor,
        on_step: StepCallback | None,
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

    def check_prompt(self, prompt: str | CheckedPrompt) -> CheckedPrompt:
        """Reject empty prompts; warn (do not fail) when a text encoder will truncate the prompt (one
        tokenizer pass per text encoder). The result names this preset in `encoders`."""
        check = check_prompt(prompt)
        warnings = list(check.warnings)
        for name, tokenizer, limit in self.prompt_token_limits():
            count = len(tokenizer(check.prompt, truncation=False, add_special_tokens=True).input_ids)
            if count > limit:
                message = (
                    f"the prompt is {count} tokens but the {name} text encoder takes {limit}: "
                    f"the last {count - limit} tokens are cut"
                )
                logger.warning(message)
                warnings.append(message)
        return CheckedPrompt(check.prompt, tuple(warnings), encoders=self.preset.name)

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

    def generate(self, call: DiffusionCall, on_step: StepCallback | None = None) -> Image.Image:
        """The base model's own image: IP scale 0 makes the IP-Adapter attention contribute nothing."""
        negative = self.negative_features()
        return self._generate_with_tokens(dataclasses.replace(call, ip_scale=0.0), negative, on_step)

    def regenerate(
        self, call: DiffusionCall, image_features: torch.Tensor, on_step: StepCallback | None = None
    ) -> Image.Image:
        """Re-generate with `image_features` (1, Si, D) as the IP-Adapter image prompt at `call.ip_scale`."""
        expected = self.image_features_shape()
        if tuple(image_features.shape[-2:]) != expected:
            raise InvalidInputError(
                f"image features of shape {tuple(image_features.shape)} do not fit the {self.family} "
                f"IP-Adapter, which takes (1, {expected[0]}, {expected[1]})"
            )
        return self._generate_with_tokens(call, image_features, on_step)

    def prompt_embeddings(self, call: DiffusionCall) -> dict[str, torch.Tensor]:
        """The text embeddings of `call`, encoded once per prompt and reused by later rounds."""
        key = self._prompt_cache_key(call)
        if key in self._prompt_embeddings:
            self._prompt_embeddings.move_to_end(key)
            return self._prompt_embeddings[key]
        with torch.no_grad():
            embeddings = self._encode_prompt(call)
        self._prompt_embeddings[key] = embeddings
        while len(self._prompt_embeddings) > PROMPT_CACHE_SIZE:
            self._prompt_embeddings.popitem(last=False)
        return embeddings

    def _generate_with_tokens(
        self, call: DiffusionCall, image_features: torch.Tensor, on_step: StepCallback | None
    ) -> Image.Image:
        if call.steps < 1:
            raise InvalidInputError(f"steps must be at least 1, got {call.steps}")
        generator = torch.Generator(device="cpu").manual_seed(int(call.seed))
        self.pipeline.set_ip_adapter_scale(float(call.ip_scale))
        prompt_embeddings = self.prompt_embeddings(call)
        with self.projection_bypassed():
            return self._call_pipeline(
                call,
                prompt_embeddings,
                generator,
                image_features.to(dtype=self.dtype),
                self.negative_features().to(dtype=self.dtype),
                on_step,
            )

    @staticmethod
    def step_reporter(call: DiffusionCall, on_step: StepCallback | None) -> dict:
        """diffusers' `callback_on_step_end` keyword argument that reports (step, steps) to `on_step`."""
        if on_step is None:
            return {}

        def report(pipeline, step: int, timestep, tensors: dict) -> dict:
            on_step(step + 1, call.steps)
            return tensors

        return {"callback_on_step_end": report}

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
