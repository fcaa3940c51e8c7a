"""Turning RGB images into model input, exactly as the model was trained and evaluated.

NumPy and Pillow (and, for the ``bicubic-antialiased`` resampler, PyTorch's CPU kernel), so every
backend (torch, ONNX Runtime) and every caller shares one path. The parameters come from the registry
entry's manifest (:class:`ml.model.Preprocessing`).

Resamplers (``Preprocessing.interpolation``), each a different answer, so each entry names the one it
was fitted and evaluated with:

- ``bilinear`` and ``bicubic``: Pillow's (``Image.resize``; bicubic with a = -0.5);
- ``bicubic-antialiased``: PyTorch's ``interpolate(..., mode="bicubic", antialias=True)`` on uint8,
  the same kernel as Pillow's (a = -0.5, widened when shrinking) in a vectorised fixed-point
  implementation: a quarter of Pillow's time (0.25 against 0.89 ms for a 300x225 image on one thread
  here), and pixels that differ from Pillow's by one level (two at most) in 0.3-0.5% of values. Large enough to
  change a label now and then (6 of 1,146 development images with v3's weights), so it is a model's
  choice, not a serving one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ml import pillow_pixels

if TYPE_CHECKING:
    from ml.model import Preprocessing

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


ANTIALIASED = "bicubic-antialiased"
#: an image more than this many times the input size on a side is box-reduced by whole factors first
REDUCING_GAP = 3.0
INTERPOLATIONS = (*_RESAMPLE, ANTIALIASED)


def resize(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Squash ``image`` to the model's input size (no crop, so no part of the lesion is lost)."""
    height, width = prep.input_size
    if image.size == (width, height):
        return image
    if prep.interpolation == ANTIALIASED:
        return Image.fromarray(resized_pixels(image, prep))
    if prep.interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {prep.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    # reducing_gap lets Pillow shrink big images in a cheap integer step first (visually identical).
    return image.resize((width, height), _RESAMPLE[prep.interpolation], reducing_gap=REDUCING_GAP)


def resized_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """(H, W, 3) uint8 pixels of the RGB ``image`` squashed to the model's input size (from the
    antialiased resampler, a view of :func:`_resampled`'s four channels: nothing is copied to drop
    the fourth)."""
    return _resampled(image, prep)[:, :, :3]


def _resampled(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The RGB ``image`` squashed to the model's input size as a C-contiguous (H, W, C) uint8 array:
    C = 4 from the antialiased resampler (RGB and a pad byte, as PyTorch's kernel writes them), else 3."""
    height, width = prep.input_size
    if image.size == (width, height) or prep.interpolation != ANTIALIASED:
        return np.asarray(resize(image, prep), dtype=np.uint8)
    import torch  # only entries that name this resampler pay for the import (the API never does)

    # As Pillow's reducing_gap does: an image over REDUCING_GAP times the input on a side is first
    # shrunk by whole factors in a cheap box step, so a 20-megapixel canvas is never copied whole
    # (Image.reduce averages a partial last block as it is, where Pillow's resize crops to a fractional
    # box: a sub-pixel difference, for images that large only)
    factors = (int(image.width / width / REDUCING_GAP) or 1, int(image.height / height / REDUCING_GAP) or 1)
    if factors != (1, 1):
        image = image.reduce(factors)
    # Pillow's pixels as it holds them, four bytes each (RGB and a pad byte), read in place
    # (ml.pillow_pixels: packing to three bytes a pixel would be a conversion, and even a copy of the
    # rows cost 0.13-0.22 ms), laid out as (1, 4, H, W) over the interleaved bytes in one call.
    # PyTorch's uint8 kernel works on four interleaved channels whatever it is given (it widens three
    # to four and narrows them back): given four it does neither, and each channel's result is the
    # same, to the bit, as each channel resampled alone. The kernel is called as interpolate(...,
    # mode="bicubic", antialias=True, align_corners=False) with a size calls it, without that
    # function's checks of its arguments (about 0.05 ms inline after a pass; a test holds the two
    # equal). Its output is kept as it wrote it, interleaved: making it planar cost more than
    # normalising saves by reading planes (0.35 against 0.42 ms for resizing and normalising one
    # image, inline after a pass)
    rows, columns = image.height, image.width
    pixels = torch.from_numpy(pillow_pixels.rgbx(image)).as_strided(
        (1, 4, rows, columns), (rows * columns * 4, 1, columns * 4, 4)
    )
    out = torch._C._nn._upsample_bicubic2d_aa(pixels, [height, width], False, None)
    return out.numpy()[0].transpose(1, 2, 0)


def shades_of_gray(pixels: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Colour constancy by the Shades of Gray estimate (Finlayson & Trezzi 2004; p=6 as in
    Barata et al. 2015 for dermoscopy): divide each channel by its Minkowski p-norm so the estimated
    illuminant becomes neutral grey, keeping the image's overall brightness."""
    x = pixels.astype(np.float32)
    norm = np.power(np.mean(np.power(x, power), axis=(0, 1)), 1.0 / power)
    gain = norm.mean() / np.maximum(norm, 1e-3)
    return np.clip(x * gain + 0.5, 0, 255).astype(np.uint8)


def to_uint8(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """(H, W, 3) uint8 array of the resized RGB image, colour-corrected where the model was."""
    return _model_pixels(image, prep)[:, :, :3]


def _model_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """:func:`to_uint8`'s pixels in a C-contiguous (H, W, C) array, C = 3 or 4 (:func:`_resampled`)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = _resampled(image, prep)
    if prep.colour_constancy == "shades_of_gray":
        # its float sums in one order, whatever the layout
        return shades_of_gray(np.ascontiguousarray(pixels[:, :, :3]))
    if prep.colour_constancy != "none":
        raise ValueError(f"unknown colour constancy {prep.colour_constancy!r}")
    return pixels


def normalize(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 normalised with the model's mean and std.

    The result is an NHWC view of a C-contiguous (N, 3, H, W) array: the layout the ONNX graphs read,
    so the backend's transpose to NCHW copies nothing. Computed a channel at a time, in the same
    float32 operations as ``(batch - mean) * inv_std`` (bit-identical), it takes about a tenth of the
    time that expression and the transpose's copy took (0.9 against 0.1 ms for one 168x224 image in a
    micro-benchmark; 0.44 against 0.15 ms for normalising alone in Predictor.predict's profile). The
    pixels are made float32 planes in one cast, then offset and scaled in place: a subtraction that
    casts as it goes runs through NumPy's buffered loop (178 against 137 us for one image inline
    after a pass, the same numbers)."""
    mean, inv_std = _normalising(tuple(prep.mean), tuple(prep.std))
    planes = batch.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    np.subtract(planes, mean, out=planes)
    np.multiply(planes, inv_std, out=planes)
    return planes.transpose(0, 2, 3, 1)


@functools.cache
def _normalising(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The (1, 3, 1, 1) float32 offsets and scales :func:`normalize` broadcasts over the planes,
    made once per model (read-only: they are shared)."""
    offset = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(1, -1, 1, 1)
    scale = (1.0 / (np.asarray(std, dtype=np.float32) * 255.0)).reshape(1, -1, 1, 1)
    offset.flags.writeable = scale.flags.writeable = False
    return offset, scale


def batch_nhwc(images: Sequence[Image.Image], prep: Preprocessing) -> np.ndarray:
    """(N, H, W, 3) float32, normalised. Transposed to NCHW it is channels-last in memory."""
    return model_input(images, prep)[1]


def model_input(images: Sequence[Image.Image], prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The (N, H, W, 3) uint8 pixels the model sees (what the out-of-distribution gate's image checks
    read; read-only, and not always C-contiguous) and :func:`batch_nhwc` of them."""
    if not images:
        height, width = prep.input_size
        return np.zeros((0, height, width, 3), dtype=np.uint8), np.zeros((0, height, width, 3), dtype=np.float32)
    arrays = [_model_pixels(image, prep) for image in images]
    if len({array.shape for array in arrays}) > 1:  # three channels and four in one batch: stack three
        arrays = [array[:, :, :3] for array in arrays]
    # one image: a view; several: stacked whole, each a block of memory, and the pad channel dropped
    # in a view (copying three channels of four goes pixel by pixel: 1.2 against 0.07 ms for eight)
    pixels = (arrays[0][None] if len(arrays) == 1 else np.stack(arrays))[:, :, :, :3]
    return pixels, normalize(pixels, prep)
