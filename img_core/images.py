"""Reading user images: any PIL-readable file or object becomes a bounded-size RGB image, or one clear
InvalidInputError.

Formats: only ACCEPTED_FORMATS (PNG and APNG, JPEG, WebP, GIF, BMP, TIFF) are opened; any other file
PIL knows (ICO, ICNS, PSD, ...) is refused by name before its reader runs. Some readers decode pixels
while "opening" (ICO decodes its embedded PNG; ICNS declares one size and decodes an embedded PNG of
another), so no header check could bound them.

Size limit: an image larger than MAX_MEGAPIXELS is refused from its header, before a single pixel is
decoded, so a small file that declares a huge canvas (a "decompression bomb") costs neither memory nor
time. The header is read through PIL's own format registry without PIL's global decompression-bomb
check, so this module never changes PIL's process-wide settings (`Image.MAX_IMAGE_PIXELS`). The one
reader that applies PIL's check itself is GIF's, when a frame is larger than the screen it declares: the
canvas grows to the frame while the header is read; PIL's DecompressionBombError (above twice PIL's
limit) becomes the same InvalidInputError, and a smaller grown canvas is refused by the cap here. A tiled
TIFF declares its tile size apart from the image's, and libtiff decodes whole tiles: tiles above the cap
are refused too.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from img_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

MAX_SIDE = 2048  # larger images are resized down (aspect kept); the models work at <= 1024 px anyway
MAX_MEGAPIXELS = 40.0  # images with more pixels than this are refused before decoding (e.g. 8000x5000)
# PIL reader ids of the formats a user image may have: their readers decode nothing before load().
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323  # TIFF tags (TIFF 6.0, section 15)
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


def check_tiff_tiles(image: Image.Image, name: str, max_megapixels: float = MAX_MEGAPIXELS) -> None:
    """Raise InvalidInputError when a tiled TIFF declares tiles larger than the megapixel cap. libtiff
    decodes a whole tile at a time, and a tile's size is declared apart from the image's: a 64x64 image
    may declare one 32768x32768 tile (1 GB decoded from a 1 MB file)."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return
    try:
        width, height = int(tags.get(TIFF_TILE_WIDTH) or 0), int(tags.get(TIFF_TILE_LENGTH) or 0)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} is a TIFF with a damaged tile size; re-save it as PNG and try again") from None
    if width * height > max_megapixels * 1e6:
        raise InvalidInputError(
            f"{name} is a TIFF whose tiles are {width}x{height} pixels ({width * height / 1e6:.1f} megapixels each), "
            f"more than the limit of {max_megapixels:g} megapixels; re-save it as PNG and try again"
        )


def read_header(file: io.BufferedIOBase) -> ImageFile.ImageFile | None:
    """Open `file` lazily (header only, no pixels decoded) with the reader of the first accepted format
    (ACCEPTED_FORMATS) that takes it, or return None. Unlike `Image.open` this applies no
    decompression-bomb check: the caller checks the size itself, so no PIL global is read or changed."""
    prefix = file.read(16)
    Image.init()
    for format_id in ACCEPTED_FORMATS:
        factory, accept = Image.OPEN[format_id]
        file.seek(0)
        try:
            accepted = accept(prefix) if accept else True
            if accepted and not isinstance(accepted, str):  # a string is PIL's "almost, but no" message
                return factory(file, "")
        except _FORMAT_ERRORS:
            continue
    return None


def format_of(prefix: bytes) -> str | None:
    """The name of the format PIL recognises from a file's first bytes (checked by signature only: no
    reader runs), or None."""
    Image.init()
    for format_id in Image.ID:
        accept = Image.OPEN[format_id][1]
        try:
            if accept is not None and accept(prefix) is True:
                return format_id
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
        except Image.DecompressionBombError as error:
            raise _bomb_error(error, name, max_megapixels) from None
        except _FORMAT_ERRORS as error:
            raise InvalidInputError(f"{name} is corrupt or truncated ({error})") from error
        if image is None:
            file.seek(0)
            known = format_of(file.read(16))
            if known in ACCEPTED_FORMATS:  # its reader refused the header
                raise InvalidInputError(f"{name} is a corrupt or truncated {known} file; re-save it as PNG and try again")
            what = f"in {known} format" if known else "not an image"
            raise InvalidInputError(f"{name} is {what}; upload a {ACCEPTED_NAMES} image (re-save it as PNG if needed)")
        check_image_size(*image.size, name, max_megapixels)
        check_tiff_tiles(image, name, max_megapixels)
        try:
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size when the file is huge
            image.load()
        except Image.DecompressionBombError as error:
            raise _bomb_error(error, name, max_megapixels) from None
        except _FORMAT_ERRORS as error:
            raise InvalidInputError(f"{name} is corrupt or truncated ({error})") from error
        return image


def _bomb_error(error: Image.DecompressionBombError, name: str, max_megapixels: float) -> InvalidInputError:
    """PIL's own bomb check (a GIF frame larger than its screen) as the cap's message."""
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    size = f" of {int(pixels.group(1)) / 1e6:.1f} megapixels" if pixels else ""
    return InvalidInputError(
        f"{name} declares an image{size} (a frame larger than its canvas), more than the limit of "
        f"{max_megapixels:g} megapixels; resize it (e.g. to 2048 px on the longer side) and try again"
    )


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
