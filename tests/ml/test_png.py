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


def test_a_real_overlay_is_smaller_than_with_zlib_level_1(fixture_images) -> None:  # type: ignore[no-untyped-def]
    """ISA-L's level 1 was chosen for speed at about the size of zlib's Huffman-only coding (2-6%
    more) and below zlib's level 1: a change of deflater or setting must not grow what every result
    stores."""
    from ml.heatmap import render

    image = Image.open(fixture_images[sorted(fixture_images)[0]]).convert("RGB")
    yy, xx = np.mgrid[0:7, 0:9]
    cam = np.exp(-((yy - 3.0) ** 2 + (xx - 4.0) ** 2) / 6.0).astype(np.float32)  # a blob, as a lesion gives
    png = render(image, cam)
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    chunks = 25 + 12 + 12  # IHDR with its 13 bytes, IDAT's framing, IEND
    rows = _up_filtered(rgb)
    level_1 = len(PNG_SIGNATURE) + chunks + len(zlib.compress(rows, 1))
    huffman_only = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    huffman = huffman_only.compress(rows) + huffman_only.flush()
    assert len(png) < 1.08 * (len(PNG_SIGNATURE) + chunks + len(huffman))
    assert len(png) < level_1


def _up_filtered(rgb: np.ndarray) -> bytes:
    height = rgb.shape[0]
    flat = rgb.reshape(height, -1)
    rows = np.empty((height, 1 + flat.shape[1]), dtype=np.uint8)
    rows[:, 0] = 2
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    return rows.tobytes()


def test_colouring_is_the_lookup_table_at_the_nearest_level() -> None:
    from ml.heatmap import _LUT, coloured

    heat = np.random.default_rng(5).random((37, 53)).astype(np.float32)
    heat[0, :3] = (0.0, 1.0, 0.5)
    rgb = np.asarray(coloured(heat))
    assert rgb.shape == (37, 53, 3)
    assert np.array_equal(rgb, _LUT[(heat * 255.0 + 0.5).astype(np.uint8)])


def test_the_overlay_is_the_upsampled_map_coloured_and_blended(fixture_pil: list[Image.Image]) -> None:
    """render makes the map's 8-bit levels in Pillow, without the float map at the overlay's size:
    its overlay must be the one drawn from that float map (upsample, coloured, blended), but for a
    level where float rounding falls the other side of a half (a colour a level or two off, rarely)."""
    from ml import heatmap

    rng = np.random.default_rng(6)
    differing = total = 0
    for i, image in enumerate(fixture_pil * 3):
        if i % 3 == 1:  # overlays smaller and larger than the image, and one larger than max_side
            image = image.resize((int(rng.integers(60, 1200)), int(rng.integers(60, 900))))
        cam = rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)))).astype(np.float32)
        size = heatmap.overlay_size(image.size)
        base = image if image.size == size else image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        expected = Image.blend(heatmap.coloured(heatmap.upsample(cam, size)), base, heatmap.IMAGE_WEIGHT)
        drawn = np.asarray(Image.open(io.BytesIO(heatmap.render(image, cam))), dtype=np.int16)
        assert drawn.shape == (size[1], size[0], 3)
        difference = np.abs(drawn - np.asarray(expected, dtype=np.int16))
        assert difference.max() <= 2
        differing += int(np.count_nonzero(difference))
        total += difference.size
    assert differing <= 1e-4 * total


def test_a_map_with_non_finite_cells_is_drawn_as_if_they_were_its_end_levels() -> None:
    """A NaN cell would spread to every level of its row and column through the products (0 x NaN is
    NaN): the levels are those of the map with NaN and -inf at level 0 and +inf at the top, and the
    cells around them keep their own."""
    from ml import heatmap

    cam = np.random.default_rng(8).random((6, 7)).astype(np.float32)
    broken = cam.copy()
    broken[1, 2], broken[4, 0], broken[5, 6] = np.nan, np.inf, -np.inf
    mended = cam.copy()
    mended[1, 2], mended[4, 0], mended[5, 6] = 0.0, 1.0, 0.0
    for size in [(300, 225), (7, 6), (3, 2)]:
        assert heatmap._levels(broken, size) == heatmap._levels(mended, size)
    assert heatmap._levels(cam, (300, 225)) != heatmap._levels(mended, (300, 225))


def test_the_levels_are_pillows_float_resize_of_the_map_enlarged_or_reduced() -> None:
    """The overlay's levels come from two matrix products with Pillow's bilinear weights: they must be
    what Pillow's own float resize of the map gives, a level off only where rounding falls the other
    side of an integer, for maps enlarged and reduced (an image smaller than the map) and 1-pixel sides."""
    from ml import heatmap

    rng = np.random.default_rng(7)
    differing = total = 0
    for _ in range(400):
        cam = rng.random((int(rng.integers(1, 10)), int(rng.integers(1, 10)))).astype(np.float32)
        cam[0, 0] = 1.2 if rng.random() < 0.5 else -0.1  # out of [0, 1]: clipped to the end levels
        size = (int(rng.integers(1, 40)), int(rng.integers(1, 40))) if rng.random() < 0.5 else (300, 225)
        grid = cam * np.float32(255.0) + np.float32(0.5)
        expected = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BILINEAR).convert("L"), np.int16)
        drawn = np.frombuffer(heatmap._levels(cam, size), dtype=np.uint8).reshape(size[1], size[0])
        difference = np.abs(drawn.astype(np.int16) - expected)
        assert difference.max() <= 1
        differing += int(np.count_nonzero(difference))
        total += difference.size
    assert differing <= 1e-4 * total
