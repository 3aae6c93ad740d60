"""Hostile and damaged image files for the image gate's tests and benchmarks/bench_reliability.py: small
files that declare (or, read naively, decode to) huge images, in each format a reader might be fooled by.
Each builder is a few lines over the format's specification; none needs the image it declares in memory."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of width x height: a few KB that decode to width*height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, kind, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ico_holding(png: bytes) -> bytes:
    """An ICO file with one entry: `png` (Pillow's ICO reader decodes it while opening the file)."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0x0 means 256x256
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def icns_holding(png: bytes) -> bytes:
    """An ICNS file declaring one 1024x1024 icon (ic10) whose data is `png`, whatever its real size."""
    body = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def gif_with_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first frame is `frame` pixels on a `screen`-sized canvas (a few bytes of pixel data)."""
    header = b"GIF89a" + struct.pack("<HH", *screen) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, *frame) + b"\x00"
    return header + descriptor + b"\x02\x02\x44\x01\x00" + b"\x3b"


def apng_bomb(width: int, height: int) -> bytes:
    """An animated PNG (acTL + fcTL before the data) of width x height."""
    control = png_chunk(b"acTL", struct.pack(">II", 1, 0))
    frame = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, width, height, 0, 0, 1, 10, 0, 0))
    plain = png_bomb(width, height)
    return plain[:33] + control + frame + plain[33:]  # after the signature and IHDR


def animated_webp(width: int = 16, height: int = 16) -> bytes:
    """A real two-frame WebP of 16x16 whose canvas (VP8X) is patched to declare width x height."""
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    canvas = data.index(b"VP8X") + 12  # 24-bit width - 1, then height - 1
    data[canvas : canvas + 3] = (width - 1).to_bytes(3, "little")
    data[canvas + 3 : canvas + 6] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def tiled_tiff(side: int, tile: int, value: int = 0) -> bytes:
    """A side x side 8-bit grey TIFF stored as one deflated tile of tile x tile pixels, all `value`
    (TIFF 6.0's tiled layout: the tile size is declared apart from the image size)."""
    compressor, row_block = zlib.compressobj(9), bytes([value]) * (1 << 20)
    data, left = b"", tile * tile
    while left:  # streamed: building a bomb must not cost what decoding it would
        data += compressor.compress(row_block[: min(left, len(row_block))])
        left -= min(left, len(row_block))
    data += compressor.flush()
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1), (322, 4, tile),
            (323, 4, tile), (324, 4, 0), (325, 4, len(data))]
    directory_size = 2 + 12 * len(tags) + 4
    tags[-2] = (324, 4, 8 + directory_size)  # the tile's data follows the directory
    entries = b"".join(struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else
                                                            struct.pack("<I", value)) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\x00" * 4 + data


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:

    buffer = io.BytesIO()
    Image.new("P", (16, 16)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    data[data.index(b"\x2c") + 5 : data.index(b"\x2c") + 9] = struct.pack("<HH", width, height)  # image size
    return bytes(data)

