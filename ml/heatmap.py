"""Drawing a Grad-CAM map over its image and encoding the overlay as PNG.

NumPy and Pillow only. The overlay keeps the image's aspect ratio and is drawn at the size of the
image it is given, reduced to ``max_side`` (``DERMQ_OVERLAY_MAX_SIDE``, 512) on the longer side when
larger. The worker gives it the image it classified, so an upload up to ``max_side`` on its longer
side gets an overlay at its own size, and a larger one an overlay ``max_side`` on its longer side
(512x384 for a 600x450 JPEG or a 12-megapixel PNG). A JPEG over ``2 * max_side`` on its longer side
is the exception: the worker classifies its working copy (:mod:`ml.working_copy`), a 1/2, 1/4 or
1/8-scale draft decode (reduced to ``max_side`` if still larger), so between ``max_side / 2`` and
``max_side`` on its longer side, and the overlay has that size (500x375 for a 4000x3000 photo,
375x250 for 3000x2000). A JPEG whose copy would keep under 224 pixels on its shorter side gets no
copy, and so a ``max_side`` overlay (2048x1536: 512x384).
The map itself comes from the model's last feature map, a few cells a side (6x7 for the served
168x224 input), so a larger overlay shows no more of it; on a 4000x3000 JPEG a 1024-pixel overlay
takes about 104 ms to draw and encode, a 512-pixel one about 20 (clinicians keep the original
image for detail). Colouring is a 256-entry lookup table
and blending is Pillow's, both on uint8: within 3 levels (rounding) of the float formula.

The PNG is written by :func:`encode_png`: every row with PNG's "Up" filter, then deflated by ISA-L
(Intel's Intelligent Storage Acceleration Library, through ``isal``) at its level 1, a standard
zlib stream any PNG reader inflates. Pillow's encoder (at ``compress_level=1``) tries every filter
on every row: measured side by side on this project's 2-core VM, a 512x384 overlay took 21.0 ms
(193 KB) with Pillow and 7.7 ms (190 KB) with "Up" and zlib level 1. Deflating the filtered rows
of the fixture lesions' real overlays on a 2-core AMD EPYC VM without AVX-512, means of 9:

| overlay | zlib level 1 | zlib Huffman-only | ISA-L level 0 | ISA-L level 1 |
| --- | --- | --- | --- | --- |
| 300x225 | 4.1 ms, 94.3 KB | 3.9 ms, 88.6 KB | 1.0 ms, 109.1 KB | 1.1 ms, 92.4 KB |
| 512x384 | 10.5 ms, 213.2 KB | 11.0 ms, 198.7 KB | 2.2 ms, 228.4 KB | 2.8 ms, 203.6 KB |

ISA-L's level 1 costs 2-6% more bytes than Huffman-only coding for a quarter of the time; it is on
the worker's path to every result.

Colouring goes through a palette image: the map's 256 levels index :data:`_LUT` and Pillow expands
them to RGB (0.1 ms for 300x225, against 1.4-1.6 ms for NumPy's fancy indexing; the same pixels).
:func:`render` makes those levels without Pillow's float map at the overlay's size (nothing on the
worker's path reads one): it enlarges ``255 * cam + 0.5`` with Pillow's bilinear weights, as two
small float32 matrix products, and truncates it to 8 bits, the levels :func:`coloured` takes from
:func:`upsample`'s map (a level off for about two pixels in a million, where rounding falls the other
side of an integer). After a forward pass, a 300x225 overlay took 0.85 against 0.97 ms drawn and
encoded with the levels from Pillow's float resize and the array read through Pillow's array interface.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
from isal import isal_zlib
from PIL import Image

from ml.images import fit_within

DEFAULT_MAX_SIDE = 512
IMAGE_WEIGHT = 0.55


def overlay_size(size: tuple[int, int], max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the overlay for an image of ``size`` (width, height)."""
    return fit_within(size, max_side)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map in [0, 1] -> (H, W) float32 in [0, 1] at ``size`` (width, height), bilinear."""
    image = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))
    resized = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def colormap(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, the familiar blue-to-red 'jet' ramp."""
    x = heat[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    rgb = np.clip(1.5 - np.abs(x - centres), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


_LUT = colormap(np.linspace(0.0, 1.0, 256, dtype=np.float32))  # (256, 3) uint8
_PALETTE = _LUT.tobytes()


def coloured(heat: np.ndarray) -> Image.Image:
    """(H, W) in [0, 1] -> RGB image of :func:`colormap` at the nearest of 256 levels."""
    levels = (heat * 255.0 + 0.5).astype(np.uint8)
    return _palette_rgb(levels.tobytes(), (levels.shape[1], levels.shape[0]))


def _palette_rgb(levels: bytes, size: tuple[int, int]) -> Image.Image:
    indexed = Image.frombytes("P", size, levels)
    indexed.putpalette(_PALETTE)
    return indexed.convert("RGB")


def render(image: Image.Image, cam: np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> bytes:
    """Blend ``cam`` over ``image`` at :func:`overlay_size`; returns the overlay as PNG bytes.

    Pixel = IMAGE_WEIGHT * image + (1 - IMAGE_WEIGHT) * colour(heat), ``heat`` being
    :func:`upsample`'s map of ``cam`` at the overlay's size (at the nearest of 256 levels)."""
    size = overlay_size(image.size, max_side)
    base = image if image.size == size else image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if base.mode != "RGB":
        base = base.convert("RGB")
    blended = Image.blend(_palette_rgb(_levels(cam, size), size), base, IMAGE_WEIGHT)  # colour * (1 - w) + base * w
    # the packed bytes as an array: NumPy reading Pillow's array interface takes three times as long
    return encode_png(np.frombuffer(blended.tobytes(), dtype=np.uint8).reshape(size[1], size[0], 3))


def _levels(cam: np.ndarray, size: tuple[int, int]) -> bytes:
    """The 8-bit levels :func:`coloured` takes from :func:`upsample`'s map, at ``size`` (width, height).

    255 * cam + 0.5 enlarged with upsample's bilinear weights (they sum to 1), a pass along the rows
    then one along the columns as Pillow makes them, as two small matrix products in float32; then
    clipped and truncated to 8 bits: the nearest level. Pillow's own float resize of the grid takes
    four times as long at an overlay's size, and the two agree but for a level where float rounding
    falls the other side of an integer (about two pixels in a million, one level off)."""
    # a NaN would reach every level of its row and column through the products (0 x NaN is NaN),
    # where Pillow's resize kept it local: none reaches them (the map is normalised to [0, 1] before;
    # np.nan_to_num only where one is not finite: the call costs five times the check)
    grid = np.asarray(cam, dtype=np.float32)
    if not np.isfinite(grid).all():
        grid = np.nan_to_num(grid, nan=0.0, posinf=1.0, neginf=0.0)
    grid = grid * np.float32(255.0) + np.float32(0.5)
    width, height = size
    enlarged = _bilinear(grid.shape[0], height) @ (grid @ _bilinear(grid.shape[1], width).T)
    return np.clip(enlarged, 0.0, 255.0, out=enlarged).astype(np.uint8).tobytes()


@functools.lru_cache(maxsize=256)
def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of Pillow's bilinear resampling of ``n_in`` samples to ``n_out``
    (Resample.c, ``precompute_coeffs``: a triangle filter widened by the scale when reducing,
    normalised to sum to 1; the taps Pillow visits hold every one whose weight is not 0)."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    distance = np.abs((np.arange(n_in, dtype=np.float64)[None, :] - centre[:, None] + 0.5) / widen)
    weights = np.where(distance < 1.0, 1.0 - distance, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0.0)
    shared = weights.astype(np.float32)  # cached: every caller gets this array
    shared.setflags(write=False)
    return shared


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type: each byte minus the byte above it


def _chunk(kind: bytes, data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A chunk's four parts, for one join: its length, type, data and the CRC of type and data (PNG's
    CRC-32 is zlib's; ISA-L's computes it in a twentieth of zlib's time, 1.4 against 27 us for an
    80 KB IDAT)."""
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))
    return struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)


def _deflate(data: bytes | memoryview) -> bytes:
    return isal_zlib.compress(data, 1)


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> a PNG file (8-bit RGB, not interlaced), every row filtered with "Up",
    deflated by ISA-L at level 1 (PNG specification, sections 9.2 and 10)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("encode_png takes an (H, W, 3) uint8 array")
    height, width, _ = rgb.shape
    rows = np.empty((height, 1 + width * 3), dtype=np.uint8)
    rows[:, 0] = _UP
    flat = rgb.reshape(height, width * 3)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    chunks = (_chunk(b"IHDR", header), _chunk(b"IDAT", _deflate(rows.data)), _chunk(b"IEND", b""))
    return b"".join((PNG_SIGNATURE, *(part for chunk in chunks for part in chunk)))
