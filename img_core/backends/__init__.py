"""Diffusion backends: one flat file per family behind `DiffusionBackend` (base.py)."""

from __future__ import annotations

from img_core.backends.flux import FluxBackend
from img_core.backends.sdxl import SDXLBackend


def backend_class(family: str):
    """The backend class for a preset family ("sdxl" covers SDXL-DPO too)."""
    if family == "sdxl":
        return SDXLBackend
    if family == "flux":
        return FluxBackend
    raise ValueError(f"unknown diffusion family {family!r}; expected 'sdxl' or 'flux'")
