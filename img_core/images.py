"""Reading user images: any PIL-readable file or object becomes a bounded-size RGB image, or one clear
InvalidInputError.

Size limit: an image larger than MAX_MEGAPIXELS is refused from its header, before a single pixel is
decoded, so a small file that declares a huge canvas (a "decompression bomb") costs neither memory nor
time. The header is read through PIL's own format registry without PIL's global decompression-bomb
check, so this module never changes PIL's process-wide settings (`Image.MAX_IMAGE_PIXELS`) and PIL's
DecompressionBombWarning is never raised for an image this module refuses or accepts.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from img_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

MAX_SIDE = 2048  # larger images are resized down (aspect kept); the models work at <= 1024 px anyway
MAX_MEGAPIXELS = 40.0  # images with more pixels than this are refused before decoding (e.g. 8000x5000)
# PIL errors that mean "these bytes are not a readable image of this format".
_FORMAT_ERRORS = (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, KeyError, struct.error)


def load_image(
    source: str | Path | bytes | Image.Image | np.ndarray,
    max_side: int = MAX_SIDE,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> Image.Image:
    """Return `source` as an RGB PIL image no larger than `max_side` on its longer side.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted. A missing
    file, a folder, a non-image, a corrupt file or an image of more than `max_megapixels` raises
    InvalidInputError saying so; oversized files are refused from their header, before decoding.
    """
    if source is None:
        raise InvalidInputError("no image was given: upload or pass an image file")
    if isinstance(source, np.ndarray):
        check_image_size(source.shape[1] if source.ndim > 1 else 0, source.shape[0], "the image array", max_megapixels)
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        check_image_size(*source.size, "the image", max_megapixels)
        image = source
    else:
        image = _open(source, max_megapixels)
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


def check_image_size(width: int, height: int, name: str, max_megapixels: float = MAX_MEGAPIXELS) -> None:
    """Raise InvalidInputError when a width x height image exceeds the megapixel cap."""
    if width * height > max_megapixels * 1e6:
        raise InvalidInputError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more than the limit of "
            f"{max_megapixels:g} megapixels; resize it (e.g. to 2048 px on the longer side) and try again"
        )


def read_header(file: io.BufferedIOBase) -> ImageFile.ImageFile | None:
    """Open `file` lazily (header only, no pixels decoded) with the first PIL format plugin that accepts
    it, or return None. Unlike `Image.open` this applies no decompression-bomb check: the caller checks
    the size itself, so no PIL global is read or changed and no warning is raised."""
    prefix = file.read(16)
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for format_id in list(Image.ID):
            factory, accept = Image.OPEN[format_id]
            file.seek(0)
            try:
                accepted = accept(prefix) if accept else True
                if accepted and not isinstance(accepted, str):  # a string is PIL's "almost, but no" message
                    return factory(file, "")
            except _FORMAT_ERRORS:
                continue
    return None


def _open(source: str | Path | bytes, max_megapixels: float) -> Image.Image:
    name = "the uploaded data" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        file = io.BytesIO(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise InvalidInputError(f"{name} is a folder, not an image file; pass the path of one image")
        if not path.is_file():
            raise InvalidInputError(f"image file {name} does not exist")
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
        except OSError as error:
            raise InvalidInputError(f"image file {name} cannot be read ({error.strerror or error})") from error
    with file:
        if not file.read(1):
            raise InvalidInputError(f"{name} is an empty file, not an image")
        file.seek(0)
        try:
            image = read_header(file)
        except _FORMAT_ERRORS as error:
            raise InvalidInputError(f"{name} is corrupt or truncated ({error})") from error
        if image is None:
            raise InvalidInputError(f"{name} is not an image PIL can read (PNG, JPEG, WebP, ...)")
        check_image_size(*image.size, name, max_megapixels)
        try:
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size when the file is huge
            image.load()
        except _FORMAT_ERRORS as error:
            raise InvalidInputError(f"{name} is corrupt or truncated ({error})") from error
        return image


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
