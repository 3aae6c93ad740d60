"""User images: every mode becomes RGB, huge images shrink, non-images get one clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from img_core.errors import InvalidInputError
from img_core.images import MAX_SIDE, load_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    image = Image.new(mode, (40, 30))
    path = tmp_path / f"image.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)


def test_rgba_transparency_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_huge_image_is_resized_keeping_aspect(caplog):
    huge = Image.new("RGB", (5000, 2500), (10, 20, 30))
    with caplog.at_level("WARNING"):
        loaded = load_image(huge)
    assert loaded.size == (MAX_SIDE, MAX_SIDE // 2)
    assert "resized" in caplog.text


def test_bytes_and_arrays_are_accepted():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="JPEG")
    assert load_image(buffer.getvalue()).size == (16, 16)
    assert load_image(np.zeros((12, 14, 3), dtype=np.uint8)).size == (14, 12)


def test_bad_files_get_clear_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(InvalidInputError, match="not an image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InvalidInputError, match="corrupt or truncated|not an image"):
        load_image(truncated)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="no image"):
        load_image(None)
    with pytest.raises(InvalidInputError, match="at least 8x8"):
        load_image(Image.new("RGB", (4, 4)))
