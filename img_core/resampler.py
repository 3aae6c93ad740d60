"""The release's own feature Resampler (`resampler.pth`): the projection the SDXL aligner was trained on.

The authors' SDXL demo computes the aligner's INPUT image features with a separate `Resampler` loaded
from `shi-labs/IMG`'s `resampler.pth` over CLIP `hidden_states[-2]` (REFERENCE §5), not with the
IP-Adapter's own image projection; the re-generation still uses the IP-Adapter (and its projection for
the negative tokens). The Resampler has the IP-Adapter-plus layout, so it loads into diffusers'
`IPAdapterPlusImageProjection` with this key map (release -> diffusers):
    latents, proj_in.*, proj_out.*, norm_out.*   -> same names
    layers.{i}.0.norm1.* / norm2.*               -> layers.{i}.ln0.* / ln1.*
    layers.{i}.0.to_q.weight                     -> layers.{i}.attn.to_q.weight
    layers.{i}.0.to_kv.weight  (k rows, v rows)  -> layers.{i}.attn.to_k.weight, layers.{i}.attn.to_v.weight
    layers.{i}.0.to_out.weight                   -> layers.{i}.attn.to_out.0.weight
    layers.{i}.1.0.* / 1.1.weight / 1.3.weight   -> layers.{i}.ff.0.* / ff.1.net.0.proj.weight / ff.1.net.2.weight

Attention heads are 64 wide, as diffusers assumes for IP-Adapter plus (heads = to_q rows // 64).
`find_release_resampler` looks for `resampler.pth` beside an official aligner checkpoint;
`describe_equality` says tensor by tensor whether it equals the IP-Adapter's projection.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from img_core.errors import IncompatibleAlignerError, WeightsNotFoundError
from img_core.hub import download_file
from img_core.integrity import load_state_dict_file

logger = logging.getLogger(__name__)

RESAMPLER_FILENAME = "resampler.pth"
RESAMPLER_DIM_HEAD = 64  # the release's Resampler(dim_head=64); diffusers reads heads as to_q rows // 64

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "0.norm1": "ln0",
    "0.norm2": "ln1",
    "0.to_q": "attn.to_q",
    "0.to_out": "attn.to_out.0",
    "1.0": "ff.0",
    "1.1": "ff.1.net.0.proj",
    "1.3": "ff.1.net.2",
}
_TOP_LEVEL = ("latents", "proj_in.", "proj_out.", "norm_out.")


def resampler_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a release Resampler state dict (DDP `module.` prefixes allowed) to diffusers' names."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key == "latents" or key.startswith(_TOP_LEVEL):
            converted[key] = value
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise IncompatibleAlignerError(f"unexpected key {key!r} in {RESAMPLER_FILENAME}: not a Resampler")
        index, rest = match.groups()
        if rest.startswith("0.to_kv."):  # one matrix: k rows then v rows
            key_rows, value_rows = value.chunk(2, dim=0)
            suffix = rest.removeprefix("0.to_kv.")
            converted[f"layers.{index}.attn.to_k.{suffix}"] = key_rows
            converted[f"layers.{index}.attn.to_v.{suffix}"] = value_rows
            continue
        module, _, suffix = rest.rpartition(".")
        if module not in _LAYER_RENAMES:
            raise IncompatibleAlignerError(f"unexpected key {key!r} in {RESAMPLER_FILENAME}: not a Resampler")
        converted[f"layers.{index}.{_LAYER_RENAMES[module]}.{suffix}"] = value
    return converted


def build_resampler(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' `IPAdapterPlusImageProjection` holding a release Resampler's weights (float32, eval)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    weights = resampler_to_diffusers(state_dict)
    required = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.attn.to_q.weight", "layers.0.ff.1.net.0.proj.weight")
    missing = [key for key in required if key not in weights]
    if missing:
        raise IncompatibleAlignerError(f"{RESAMPLER_FILENAME} lacks {missing}: not a Resampler state dict")
    _, num_queries, hidden_dims = weights["latents"].shape
    inner_dim = weights["layers.0.attn.to_q.weight"].shape[0]
    if inner_dim % RESAMPLER_DIM_HEAD:
        raise IncompatibleAlignerError(
            f"{RESAMPLER_FILENAME}: attention width {inner_dim} is not a multiple of {RESAMPLER_DIM_HEAD}"
        )
    resampler = IPAdapterPlusImageProjection(
        embed_dims=weights["proj_in.weight"].shape[1],
        output_dims=weights["proj_out.weight"].shape[0],
        hidden_dims=hidden_dims,
        depth=1 + max(int(_LAYER_KEY.match(key).group(1)) for key in weights if key.startswith("layers.")),
        dim_head=RESAMPLER_DIM_HEAD,
        heads=inner_dim // RESAMPLER_DIM_HEAD,
        num_queries=num_queries,
        ffn_ratio=weights["layers.0.ff.1.net.0.proj.weight"].shape[0] // hidden_dims,
    )
    own = resampler.state_dict()
    problems = sorted(set(own) ^ set(weights)) + [
        f"{key} {tuple(weights[key].shape)} vs {tuple(own[key].shape)}"
        for key in set(own) & set(weights)
        if own[key].shape != weights[key].shape
    ]
    if problems:
        raise IncompatibleAlignerError(f"{RESAMPLER_FILENAME} does not fit a Resampler: {problems[:10]}")
    resampler.load_state_dict({key: value.float() for key, value in weights.items()})
    return resampler.eval().requires_grad_(False)


def load_release_resampler(path: str | Path) -> nn.Module:
    """Load `resampler.pth` (a plain state dict, read with `weights_only=True`) into a projection module."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist: no release Resampler to load")
    return build_resampler(load_state_dict_file(path, "a Resampler", IncompatibleAlignerError))


def find_release_resampler(aligner_repo: str | Path, aligner_filename: str | None) -> Path | None:
    """`resampler.pth` beside an official aligner checkpoint (a local folder or a cached/reachable hub
    repo), or None when there is none (saved aligner folders, offline and not cached)."""
    if aligner_filename is None:  # a save_pretrained folder: trained on the IP-Adapter's own projection
        return None
    folder = Path(str(aligner_repo)).expanduser()
    if folder.is_dir():
        candidate = folder / RESAMPLER_FILENAME
        return candidate if candidate.is_file() else None

    try:
        return download_file(str(aligner_repo), RESAMPLER_FILENAME)
    except WeightsNotFoundError as error:
        logger.warning(
            "no %s found for %s (%s): aligner input features use the IP-Adapter's projection instead",
            RESAMPLER_FILENAME, aligner_repo, error,
        )
        return None


def describe_equality(resampler: nn.Module, ip_projection: nn.Module) -> tuple[bool, list[str]]:
    """Whether `resampler` equals the IP-Adapter's projection tensor by tensor, and the names that differ
    (or do not exist on both sides)."""
    ours = resampler.state_dict()
    theirs = ip_projection.state_dict()
    differing = sorted(set(ours) ^ set(theirs))
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        if a.shape != b.shape or not torch.equal(a.float().cpu(), b.float().cpu()):
            differing.append(key)
    return not differing, differing


def log_equality(resampler: nn.Module, ip_projection: nn.Module) -> bool:
    """Log whether the release Resampler equals the IP-Adapter's projection; returns that."""
    equal, differing = describe_equality(resampler, ip_projection)
    if equal:
        logger.info("%s equals the IP-Adapter's image projection, tensor by tensor", RESAMPLER_FILENAME)
    else:
        logger.info(
            "%s differs from the IP-Adapter's image projection in %d of %d tensors (e.g. %s): "
            "aligner input features use %s",
            RESAMPLER_FILENAME, len(differing), len(resampler.state_dict()), differing[:3], RESAMPLER_FILENAME,
        )
    return equal


@torch.no_grad()
def project(resampler: nn.Module, clip_hidden_states: torch.Tensor) -> torch.Tensor:
    """Image features from CLIP `hidden_states[-2]` (1, N, E): (1, Si, D) float32 on CPU."""
    weight = next(resampler.parameters())
    return resampler(clip_hidden_states.to(device=weight.device, dtype=weight.dtype)).float().cpu()


def release_resampler_for(aligner_source, ip_projection: nn.Module) -> nn.Module | None:
    """The release Resampler that belongs to `aligner_source` (a presets.AlignerSource), on the device and
    in the dtype of the IP-Adapter's projection, with its equality to that projection logged; None when
    the aligner comes without `resampler.pth` (then the IP-Adapter's projection makes the features)."""
    path = find_release_resampler(aligner_source.repo, aligner_source.filename)
    if path is None:
        return None
    resampler = load_release_resampler(path)
    log_equality(resampler, ip_projection)
    weight = next(ip_projection.parameters())
    return resampler.to(device=weight.device, dtype=weight.dtype)
