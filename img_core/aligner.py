"""The Implicit Aligner: maps (image features, MLLM guidance) to better-aligned image features.

Architecture (REFERENCE §2, matching the authors' released module so their checkpoints load):
    g' = proj_in(guidance)                                    # (B, Sg, Dg) -> (B, Sg, D)
    c  = image_features                                       # (B, Si, D)
    repeat depth times:
        c = attn(g', c) + c      # queries from c; keys/values from concat(g', c) along the sequence
        c = ff(c) + c            # LayerNorm -> Linear(D, 4D) -> GELU -> Linear(4D, D)
    aligned = image_features + zero_linear(norm_out(proj_out(c)))

`zero_linear` starts at zero, so a freshly initialised aligner is exactly the identity: training starts
from "keep the image as it is". The released demos apply the aligner three times in a row with the same
guidance (`align(..., passes=3)`) and run it in float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from img_core.errors import CorruptFileError
from img_core.hub import download_file
from img_core.integrity import (
    check_finite,
    has_checksums,
    load_state_dict_file,
    verify_folder,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_PASSES = 3

# Image feature kinds: which IP-Adapter produced the tokens the aligner was trained on.
SDXL_FEATURES = "sdxl-ip-adapter-plus-vit-h"
FLUX_FEATURES = "flux-xlabs-ip-adapter"


@dataclass
class AlignerConfig:
    """Shape of an Implicit Aligner plus the metadata that says what it was trained with."""

    image_dim: int = 2048  # D: width of the IP-Adapter image tokens (SDXL 2048, FLUX 4096)
    guidance_dim: int = 5120  # Dg: MLLM hidden size (LLaVA-1.5-13B 5120, Qwen2.5-VL-7B 3584)
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    ff_mult: int = 4
    num_image_tokens: int = 16  # Si: SDXL plus 16, FLUX XLabs 4 (metadata; the module takes any Si)
    # Metadata: what the aligner expects at run time. Not used by the forward pass.
    image_feature_kind: str = SDXL_FEATURES
    mllm: str | None = None
    guidance_mode: str = "question"
    chat_template: str | None = None
    training_steps: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "AlignerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning("ignoring unknown aligner config keys: %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GuidedCrossAttention(nn.Module):
    """Perceiver-style attention: image tokens query the guidance tokens and themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # on the projected guidance
        self.norm2 = nn.LayerNorm(dim)  # on the image tokens
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(
        self, guidance: torch.Tensor, image_tokens: torch.Tensor, guidance_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        guidance = self.norm1(guidance)  # (B, Sg, D)
        image_tokens = self.norm2(image_tokens)  # (B, Si, D)
        batch, num_queries, _ = image_tokens.shape

        query = self.to_q(image_tokens)  # (B, Si, H*Dh)
        key, value = self.to_kv(torch.cat([guidance, image_tokens], dim=1)).chunk(2, dim=-1)  # (B, Sg+Si, H*Dh)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, self.dim_head).transpose(1, 2)  # (B, H, S, Dh)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        # Scaling q and k each by Dh^-1/4 (rather than the product by Dh^-1/2) is what the release does.
        scale = self.dim_head**-0.25
        scores = (query * scale) @ (key * scale).transpose(-2, -1)  # (B, H, Si, Sg+Si)
        scores = scores.float()
        if guidance_mask is not None:
            image_mask = torch.ones(batch, num_queries, dtype=torch.bool, device=guidance_mask.device)
            key_mask = torch.cat([guidance_mask.bool(), image_mask], dim=1)  # (B, Sg+Si)
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        out = (weights @ value).transpose(1, 2).reshape(batch, num_queries, -1)  # (B, Si, H*Dh)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear; indices 0, 1, 3 hold weights (checkpoint key layout)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class ImplicitAligner(nn.Module):
    """Turns an image's IP-Adapter tokens into tokens better aligned with the prompt, guided by an MLLM."""

    def __init__(self, config: AlignerConfig | None = None):
        super().__init__()
        self.config = config or AlignerConfig()
        dim = self.config.image_dim
        self.proj_in = nn.Linear(self.config.guidance_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    GuidedCrossAttention(dim, self.config.heads, self.config.dim_head),
                    feed_forward(dim, self.config.ff_mult),
                ]
            )
            for _ in range(self.config.depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.zero_linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.zero_linear.weight)
        nn.init.zeros_(self.zero_linear.bias)

    def forward(
        self,
        image_features: torch.Tensor,
        guidance: torch.Tensor,
        guidance_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass. image_features (B, Si, D), guidance (B, Sg, Dg), guidance_mask (B, Sg) with True =
        real token (masked tokens get zero attention weight). Returns aligned features (B, Si, D)."""
        if image_features.shape[-1] != self.config.image_dim:
            raise ValueError(
                f"image_features have width {image_features.shape[-1]} but this aligner expects "
                f"{self.config.image_dim} ({self.config.image_feature_kind})"
            )
        if guidance.shape[-1] != self.config.guidance_dim:
            raise ValueError(
                f"guidance has width {guidance.shape[-1]} but this aligner expects {self.config.guidance_dim} "
                f"(trained with MLLM {self.config.mllm or 'unknown'})"
            )
        projected_guidance = self.proj_in(guidance)  # (B, Sg, D)
        tokens = image_features
        for attention, ff in self.layers:
            tokens = attention(projected_guidance, tokens, guidance_mask) + tokens
            tokens = ff(tokens) + tokens
        return image_features + self.zero_linear(self.norm_out(self.proj_out(tokens)))

    def align(
        self,
        image_features: torch.Tensor,
        guidance: torch.Tensor,
        guidance_mask: torch.Tensor | None = None,
        passes: int = DEFAULT_PASSES,
    ) -> torch.Tensor:
        """Apply the aligner `passes` times, feeding each output back in with the same guidance."""
        if passes < 0:
            raise ValueError(f"passes must be >= 0, got {passes}")
        param = next(self.parameters())
        aligned_features = image_features.to(device=param.device, dtype=param.dtype)
        guidance = guidance.to(device=param.device, dtype=param.dtype)
        if guidance_mask is not None:
            guidance_mask = guidance_mask.to(param.device)
        for _ in range(passes):
            aligned_features = self(aligned_features, guidance, guidance_mask)
        return aligned_features

    # ----------------------------------------------------------------------------- loading & saving

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, **metadata) -> "ImplicitAligner":
        """Load the authors' released `aligner_sdxl.pth` / `aligner_flux.pth` (plain state dict, maybe
        with DDP's `module.` prefix). Dimensions are read from the weight shapes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aligner checkpoint {path} does not exist")
        state_dict = load_state_dict_file(path, "an Implicit Aligner", ValueError)
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
        config = config_from_state_dict(state_dict, **metadata)
        aligner = cls(config)
        load_state_dict_strict(aligner, state_dict, source=str(path))
        return aligner

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` (shape + metadata) and `model.safetensors`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state_dict = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        save_file(state_dict, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, subfolder: str | None = None, revision: str | None = None
    ) -> "ImplicitAligner":
        """Load a folder written by `save_pretrained`, or the same layout from a hub repo."""
        from safetensors.torch import load_file

        directory = Path(name_or_path)
        if subfolder:
            directory = directory / subfolder
        if directory.is_dir():
            config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
            for required in (config_path, weights_path):
                if not required.is_file():
                    raise FileNotFoundError(f"{required} is missing: not a saved Implicit Aligner folder")
            if has_checksums(directory):  # a trainer's RUN/final: every file as it was written
                verify_folder(directory)
        else:
            config_path = download_file(str(name_or_path), CONFIG_NAME, subfolder=subfolder, revision=revision)
            weights_path = download_file(str(name_or_path), WEIGHTS_NAME, subfolder=subfolder, revision=revision)
        config = AlignerConfig.from_dict(json.loads(Path(config_path).read_text()))
        aligner = cls(config)
        try:
            state_dict = load_file(str(weights_path))
        except Exception as error:  # noqa: BLE001 - safetensors reports damage as several error types
            raise CorruptFileError(f"{weights_path} is not a readable safetensors file ({error})") from error
        load_state_dict_strict(aligner, state_dict, source=str(weights_path))
        return aligner


def config_from_state_dict(state_dict: dict[str, torch.Tensor], **metadata) -> AlignerConfig:
    """Infer an AlignerConfig from the weight shapes of a (prefix-free) aligner state dict."""
    required = ["proj_in.weight", "zero_linear.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"not an Implicit Aligner state dict: missing keys {missing} "
            f"(found e.g. {sorted(state_dict)[:5]})"
        )
    image_dim, guidance_dim = state_dict["proj_in.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("layers."))
    inner_dim = state_dict["layers.0.0.to_q.weight"].shape[0]
    dim_head = metadata.pop("dim_head", 64)
    if inner_dim % dim_head:
        raise ValueError(f"attention width {inner_dim} is not a multiple of dim_head={dim_head}")
    ff_mult = state_dict["layers.0.1.1.weight"].shape[0] // image_dim
    if "image_feature_kind" not in metadata:
        metadata["image_feature_kind"] = FLUX_FEATURES if image_dim == 4096 else SDXL_FEATURES
    if "num_image_tokens" not in metadata:
        metadata["num_image_tokens"] = 4 if metadata["image_feature_kind"] == FLUX_FEATURES else 16
    return AlignerConfig(
        image_dim=int(image_dim),
        guidance_dim=int(guidance_dim),
        depth=depth,
        heads=inner_dim // dim_head,
        dim_head=dim_head,
        ff_mult=int(ff_mult),
        **metadata,
    )


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one error that lists missing/unexpected keys and shape mismatches; weights
    holding NaN or infinity are refused (CorruptFileError naming `source` and the tensors)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state_dict))
        if state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the Implicit Aligner: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {mismatched[:10]}"
        )
    check_finite(state_dict, source)
    module.load_state_dict(state_dict)
