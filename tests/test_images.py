"""User images: every mode becomes RGB, huge images shrink, non-images get one clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from img_core.errors import InvalidInputError
from img_core.images import MAX_SIDE, load_image
from tests.hostile_images import (
    animated_webp,
    apng_bomb,
    gif_with_frame,
    icns_holding,
    ico_holding,
    png_bomb,
    tiled_tiff,
)


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


# --- one gate for every format (issue 19, finding 1) ---------------------------------------------------


SIDE = 13_000  # 169 Mpx: decoding one as RGB costs ~500 MB, as 1-bit ~165 MB
HOSTILE = {
    "png": lambda: png_bomb(SIDE, SIDE),
    "ico": lambda: ico_holding(png_bomb(SIDE, SIDE)),
    "ico-20000": lambda: ico_holding(png_bomb(20_000, 20_000)),
    "icns": lambda: icns_holding(png_bomb(SIDE, SIDE)),
    "gif-frame": lambda: gif_with_frame((16, 16), (20_000, 20_000)),
    "gif-frame-9000": lambda: gif_with_frame((16, 16), (9000, 9000)),
    "apng": lambda: apng_bomb(SIDE, SIDE),
    "animated-webp": lambda: animated_webp(SIDE, SIDE),
    "tiff-tile": lambda: tiled_tiff(64, 16_384),  # a 64x64 image in one 16384x16384 tile
}

RSS_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tests.test_images as t
from img_core.errors import InvalidInputError
from img_core.images import load_image

def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry pytest's over exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024

growth = {}
for name, build in t.HOSTILE.items():
    data = build()
    before = peak_mb()
    try:
        load_image(data)
        outcome = "accepted"
    except InvalidInputError as error:
        outcome = str(error)
    except Exception as error:
        outcome = f"UNCAUGHT {type(error).__name__}: {error}"
    growth[name] = [peak_mb() - before, outcome]
print(json.dumps(growth))
"""


def test_hostile_formats_are_refused_without_decoding():
    """ICO, ICNS, a GIF frame larger than its screen, APNG and animated WebP bombs: each refused with one
    line, and a fresh process's peak RSS grows no more than for a PNG header bomb (a decode: +165 MB)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root)], capture_output=True, text=True, timeout=120,
                           cwd=root)
    assert probe.returncode == 0, probe.stderr
    growth = json.loads(probe.stdout)
    for name, (megabytes, message) in growth.items():
        assert megabytes < 20, f"{name}: peak RSS +{megabytes:.0f} MB (decoded?)"
        assert "\n" not in message and not message.startswith(("accepted", "UNCAUGHT")), f"{name}: {message}"
    assert "in ICO format" in growth["ico"][1] and "PNG, JPEG, WebP, GIF, BMP or TIFF" in growth["ico"][1]
    assert "in ICO format" in growth["ico-20000"][1] and "in ICNS format" in growth["icns"][1]
    assert "400.0 megapixels" in growth["gif-frame"][1] and "limit of 40" in growth["gif-frame"][1]
    assert "9000x9000 pixels" in growth["gif-frame-9000"][1]
    for name in ("png", "apng", "animated-webp"):
        assert f"{SIDE}x{SIDE} pixels" in growth[name][1], growth[name]
    assert "TIFF whose tiles are 16384x16384 pixels" in growth["tiff-tile"][1]


def test_a_tiled_tiff_with_tiles_under_the_cap_loads():
    loaded = load_image(tiled_tiff(64, 64, value=200))
    assert loaded.size == (64, 64) and loaded.getpixel((10, 10)) == (200, 200, 200)
    loaded = load_image(tiled_tiff(40, 64, value=90))  # a tile larger than the image is allowed
    assert loaded.size == (40, 40) and loaded.getpixel((39, 39)) == (90, 90, 90)


def test_a_damaged_file_of_an_accepted_format_is_called_damaged():
    png = bytearray(_png_of(Image.new("RGB", (32, 32), (9, 9, 9))))
    png[29] ^= 0xFF  # inside IHDR: its checksum no longer matches
    with pytest.raises(InvalidInputError, match=r"^the uploaded data is a corrupt or truncated PNG file; re-save"):
        load_image(bytes(png))


@pytest.mark.parametrize("kind", ["gif", "apng", "webp", "bmp", "tiff"])
def test_accepted_formats_still_load(tmp_path, kind):
    frames = [Image.new("RGB", (24, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    if kind == "apng":
        frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    elif kind in ("gif", "webp", "tiff"):
        frames[0].save(buffer, kind.upper(), save_all=True, append_images=frames[1:])
    else:
        frames[0].save(buffer, kind.upper())
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (24, 16) and loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((5, 5))
    assert red > 200 and blue < 50, "the first frame is the image"


def test_other_formats_name_the_accepted_ones(tmp_path):
    small_icon = ico_holding(_png_of(Image.new("RGB", (32, 32), (9, 9, 9))))
    with pytest.raises(InvalidInputError, match=r"in ICO format; upload a PNG, JPEG, WebP, GIF, BMP or TIFF image"):
        load_image(small_icon)
    path = tmp_path / "picture.psd"
    Image.new("RGB", (32, 32)).save(tmp_path / "picture.pcx")
    path.write_bytes((tmp_path / "picture.pcx").read_bytes())
    with pytest.raises(InvalidInputError, match=r"picture.psd is in PCX format; upload a PNG"):
        load_image(path)


def _png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
