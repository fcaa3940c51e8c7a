"""EXIF orientation: every one of the eight turns the image as Pillow's ``ImageOps.exif_transpose``
does, and a large EXIF block costs nothing more for it (ml.orientation.upright)."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageOps

from ml.images import decode

ORIENTATION = 0x0112


def _png(image: Image.Image, exif: bytes) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


def _asymmetric() -> Image.Image:
    """An image no turn or mirror maps onto itself: a colour per quadrant, 60 x 40 (dermq's least is 32)."""
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[:2, :3], pixels[:2, 3:] = (250, 0, 0), (0, 250, 0)
    pixels[2:, :3], pixels[2:, 3:] = (0, 0, 250), (250, 250, 0)
    pixels[0, 0] = (255, 255, 255)
    return Image.fromarray(pixels).resize((60, 40), Image.Resampling.NEAREST)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_turns_the_image_upright_as_pillow_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = _png(_asymmetric(), exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    decoded = decode(data).image
    assert decoded.size == expected.size
    assert np.array_equal(np.asarray(decoded), np.asarray(expected.convert("RGB")))


def test_a_large_exif_block_is_not_rebuilt_to_turn_the_image() -> None:
    # a PNG's EXIF has no size limit: 200,000 values in one private tag, with the orientation that
    # turns the image; Pillow's exif_transpose rebuilt the block, every value a Python object (62 MiB
    # and 1.5 s for this 1.6 MB file; 186 MiB and 4.7 s at 600,000), none of it in the decode budget
    count = 200_000
    entries = struct.pack("<HHI", ORIENTATION, 3, 1) + struct.pack("<HH", 6, 0)
    entries += struct.pack("<HHII", 0xC000, 5, count, 8 + 2 + 12 * 2 + 4)  # RATIONAL values after the IFD
    block = b"II*\x00" + struct.pack("<IH", 8, 2) + entries + b"\0\0\0\0" + b"\x01\0\0\0\x03\0\0\0" * count
    data = _png(Image.new("RGB", (64, 48), (200, 120, 100)), b"Exif\x00\x00" + block)
    tracemalloc.start()
    try:
        decoded = decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.image.size == (48, 64)  # turned
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
