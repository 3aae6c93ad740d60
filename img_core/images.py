"""Reading user images: any PIL-readable file or object becomes a bounded-size RGB image, or one clear
InvalidInputError."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from img_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

MAX_SIDE = 2048  # larger images are resized down (aspect kept); the models work at <= 1024 px anyway
MAX_PIXELS_TO_OPEN = 16_384 * 16_384  # refuse decompression bombs beyond this


def load_image(source: str | Path | bytes | Image.Image | np.ndarray, max_side: int = MAX_SIDE) -> Image.Image:
    """Return `source` as an RGB PIL image no larger than `max_side` on its longer side.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted. A missing,
    non-image or corrupt file raises InvalidInputError saying so.
    """
    if source is None:
        raise InvalidInputError("no image was given: upload or pass an image file")
    if isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source)
    try:
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"the image could not be decoded ({error}); try re-saving it as PNG or JPEG") from error
    if max(image.size) > max_side:
        original = image.size
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        logger.warning("image of %dx%d resized to %dx%d", *original, *image.size)
    if min(image.size) < 8:
        raise InvalidInputError(f"the image is only {image.size[0]}x{image.size[1]} pixels; use one of at least 8x8")
    return image


def _open(source: str | Path | bytes) -> Image.Image:
    name = "the uploaded data" if isinstance(source, bytes) else str(source)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise InvalidInputError(f"image file {name} does not exist")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS_TO_OPEN
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size when the file is huge
        image.load()
        return image
    except UnidentifiedImageError as error:
        raise InvalidInputError(f"{name} is not an image PIL can read (PNG, JPEG, WebP, ...)") from error
    except Image.DecompressionBombError as error:
        raise InvalidInputError(f"{name} is too large to open safely ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidInputError(f"{name} is corrupt or truncated ({error})") from error
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidInputError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(array.max(), 1.0)
        return Image.fromarray((array * scale).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, F, ...
