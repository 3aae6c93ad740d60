"""Small test data builders shared by several test modules."""

import io

import numpy as np


def png_bytes(seed: int, height: int = 48, width: int = 64) -> bytes:
    """A random RGB image encoded as PNG, the same for the same seed (dataset rows in tests)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
