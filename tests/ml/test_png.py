"""The heat map's PNG writer (ml.heatmap.encode_png): lossless, valid, and read back by Pillow and zlib
exactly as written, whatever the size."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ml.heatmap import PNG_SIGNATURE, encode_png


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5), (384, 512), (225, 300)])
def test_pixels_come_back_exactly(shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    png = encode_png(rgb)
    image = Image.open(io.BytesIO(png))
    image.verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), rgb)


def test_the_file_is_the_specifications_layout() -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[2:] = 255  # a jump between rows 1 and 2: "Up" stores it once, on row 2
    png = encode_png(rgb)
    assert png.startswith(PNG_SIGNATURE)
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data)
        chunks.append((kind, data))
        at += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (6, 4, 8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(4, 1 + 6 * 3)
    assert (rows[:, 0] == 2).all()  # every row filtered "Up"
    assert (rows[2, 1:] == 255).all() and (rows[3, 1:] == 0).all() and (rows[1, 1:] == 0).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))])
def test_anything_but_rgb_bytes_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_png(bad)
