"""ml.pillow_pixels: an RGB image's pixels read in Pillow's own memory, or copied where they cannot be."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from PIL import Image

from ml import pillow_pixels


def _copied(image: Image.Image) -> np.ndarray:
    return np.frombuffer(image.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(image.height, image.width, 4)


@pytest.mark.skipif(not pillow_pixels.EXPORTS, reason="this Pillow's export is not read (before Pillow 13)")
def test_the_pixels_are_pillows_own_memory_and_outlive_the_image(fixture_pil: list[Image.Image]) -> None:
    image = fixture_pil[0].copy()
    expected = _copied(image)
    pixels = pillow_pixels.rgbx(image)
    assert pixels.shape == (image.height, image.width, 4) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, expected)
    assert not pixels.flags.owndata and isinstance(pixels.base, pillow_pixels._Pixels)  # a view, not a copy
    image.putpixel((0, 0), (1, 2, 3))  # the same memory: a change to the image shows in the view
    assert tuple(pixels[0, 0, :3]) == (1, 2, 3)
    image.putpixel((0, 0), tuple(int(v) for v in expected[0, 0, :3]))
    del image
    gc.collect()
    churn = [Image.new("RGB", (300, 225), (9, 9, 9)) for _ in range(20)]  # memory freed would be reused
    assert np.array_equal(pixels, expected) and len(churn) == 20


def test_an_image_in_several_blocks_is_copied_with_the_same_bytes() -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))  # 48 MB: Pillow's blocks are 16
    pixels = pillow_pixels.rgbx(image)
    assert pixels.flags.owndata or not isinstance(pixels.base, pillow_pixels._Pixels)
    assert np.array_equal(pixels, _copied(image))


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (0, 0)])
def test_any_size_reads_as_its_copy(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    assert np.array_equal(pillow_pixels.rgbx(image), _copied(image))


def test_only_rgb_images_are_read() -> None:
    with pytest.raises(ValueError, match="RGB"):
        pillow_pixels.rgbx(Image.new("L", (4, 4)))


def test_padded_rows_and_borrowed_memory_are_copied_with_the_same_bytes() -> None:
    rng = np.random.default_rng(4)
    array = rng.integers(0, 256, (30, 37, 3), dtype=np.uint8)
    alignment = Image.core.get_alignment()
    Image.core.set_alignment(64)  # PILLOW_ALIGNMENT: every row padded to 64 bytes
    try:
        padded = Image.fromarray(array)
    finally:
        Image.core.set_alignment(alignment)
    pixels = pillow_pixels.rgbx(padded)
    assert not isinstance(pixels.base, pillow_pixels._Pixels)
    assert np.array_equal(pixels, _copied(padded)) and np.array_equal(pixels[:, :, :3], array)
    if hasattr(Image, "fromarrow"):  # Pillow 11.2 and later: an image over another image's memory
        borrowed = Image.fromarrow(Image.fromarray(array), "RGB", (37, 30))
        assert borrowed.readonly  # memory Pillow's image does not own is never read in place
        pixels = pillow_pixels.rgbx(borrowed)
        assert not isinstance(pixels.base, pillow_pixels._Pixels)
        assert np.array_equal(pixels[:, :, :3], array)
