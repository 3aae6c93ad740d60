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


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of width x height: a few KB that decode to width*height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header_without_warnings(tmp_path):
    import time
    import warnings

    bomb = png_bomb(9000, 9000)  # 81 Mpx in ~10 KB; decoding it would take ~250 MB as RGB
    assert len(bomb) < 50_000
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any PIL warning fails the test
        with pytest.raises(InvalidInputError, match=r"9000x9000 pixels \(81.0 megapixels\), more than the limit of 40"):
            load_image(bomb)
        path = tmp_path / "bomb.png"
        path.write_bytes(png_bomb(13000, 13000))  # 169 Mpx: between PIL's own warning and error limits
        with pytest.raises(InvalidInputError, match=rf"{path} is 13000x13000 pixels"):
            load_image(path)
    assert time.perf_counter() - start < 1.0  # refused from the header, not decoded
    assert Image.MAX_IMAGE_PIXELS == limit_before
    with pytest.raises(InvalidInputError, match="6000x7000"):
        load_image(Image.new("1", (6000, 7000)))  # already-decoded images obey the same cap
    assert load_image(png_bomb(2000, 1000)).size == (2000, 1000)  # 2 Mpx: fine


def test_a_folder_is_named_a_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(InvalidInputError, match="empty.png is an empty file, not an image"):
        (tmp_path / "empty.png").write_bytes(b"")
        load_image(tmp_path / "empty.png")
