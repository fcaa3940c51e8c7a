"""A per-process budget of memory for decoding images, shared by concurrent decodes.

A small compressed file can declare a large canvas: a 190 KB PNG decodes to 7000x7000 RGBA, about
200 MB, and the conversions that follow (EXIF transpose, alpha compositing, colour management) hold
copies of it. The pixel cap alone bounds one decode, not eight at once. Each decode therefore
*reserves* its estimated peak (:func:`estimate_peak_bytes`, known from the header before any pixel is
decoded) against one budget per process; a reservation that does not fit waits briefly for others to
finish, then gives up with :class:`DecodeBusy` (the API answers 429 with ``Retry-After``; the worker
retries the case later). A single image whose estimate exceeds the whole budget can never fit and is
refused as too large.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: Bytes per pixel Pillow holds for an image of each mode: one for 1, L and P, two for 16-bit
#: greyscale, four for every other (RGB is stored as four bytes a pixel too).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}

#: Modes whose alpha is composited onto black (and P with a transparent colour).
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

#: Bytes per pixel of the images the conversion to 8-bit RGB makes on the way, for modes without alpha.
_CONVERSION_BYTES = {"RGB": 0, "1": 5, "I;16": 9, "I;16L": 9, "I;16B": 9, "I;16N": 9, "I": 9, "F": 0}


class DecodeBusy(Exception):
    """The decode budget stayed full for longer than the caller would wait: try again shortly."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"decoding capacity is in use; retry in {retry_after} s")
        self.retry_after = retry_after


class TooLargeToDecode(Exception):
    """The image's estimated decoding peak exceeds the whole budget: it can never be decoded here."""

    def __init__(self, needed: int, capacity: int) -> None:
        super().__init__(f"decoding needs about {needed / 2**20:.0f} MiB; the limit is {capacity / 2**20:.0f} MiB")
        self.needed = needed
        self.capacity = capacity


def estimate_peak_bytes(
    width: int,
    height: int,
    mode: str,
    *,
    fmt: str | None = None,
    transparency: bool = False,
    oriented: bool = False,
    profiled: bool = False,
) -> int:
    """The most memory decoding a ``width`` x ``height`` image in Pillow ``mode`` holds at once.

    Per pixel: the decoded canvas, then what the conversion to 8-bit RGB makes on the way. Without
    alpha, that is the RGB result (for L, P, CMYK, YCbCr...) or the 16-bit path's intermediates. With
    alpha (``mode`` in :data:`ALPHA_MODES`, or a palette with a ``transparency`` colour), it is the RGBA
    canvas, the colour without its alpha, the alpha put back, the black background and the composite:
    20 bytes a pixel more, 24 for a palette or premultiplied mode, which is converted to RGBA first.
    WebP adds libwebp's own output buffer, copied into the canvas. ``oriented`` (an EXIF orientation to
    apply) adds a turned copy of the canvas, ``profiled`` (an embedded ICC profile) the RGB image the
    profile is applied into. One byte a pixel of headroom on top.

    Measured as peak resident memory over the decode of 4000x4000 images, against this estimate
    (bytes a pixel, no EXIF orientation, no profile): RGB JPEG, PNG, TIFF and BMP 4.0 (5);
    L 5.0 (6); P 5.0 (6); 1-bit 6.0 (7); CMYK 8.0 (9); 16-bit greyscale 11.0 (12); RGBA and LA
    24.0 (25); P with a transparent colour 25.0 (26); RGB WebP 16.1 (17).
    """
    storage = _STORAGE_BYTES.get(mode, 4)
    if mode in ALPHA_MODES or (mode == "P" and transparency):
        per_pixel = storage + 20 + (0 if mode in ("RGBA", "LA") else 4)
    else:
        per_pixel = storage + _CONVERSION_BYTES.get(mode, 4)
    if fmt == "WEBP":
        per_pixel += 12
    if oriented:
        per_pixel += storage
    if profiled:
        per_pixel += 4
    return width * height * (per_pixel + 1)


def estimate_for(image: Image.Image, fmt: str) -> int:
    """:func:`estimate_peak_bytes` for an opened, not yet decoded ``image`` of format ``fmt``, from what
    its header says (size, mode, transparency, ICC profile). An EXIF turn is always counted: asking
    Pillow for a PNG's EXIF decodes the whole image when the block follows the pixels, before any
    memory is reserved."""
    return estimate_peak_bytes(
        image.width,
        image.height,
        image.mode,
        fmt=fmt,
        transparency="transparency" in image.info,
        oriented=True,
        profiled=bool(image.info.get("icc_profile")),
    )


def jpeg_coefficient_bytes(image: Image.Image, width: int, height: int) -> int:
    """libjpeg's whole-image coefficient buffer for a JPEG of declared ``width`` x ``height`` that needs
    one (jdcoefct.c: a progressive file, or a sequential one in several scans), at the declared size
    whatever scale a draft decodes at: two bytes a sample of each component at its sampling, in whole
    8x8 blocks (6 bytes a pixel at 4:4:4, 3 at 4:2:0). Measured: a flat 12000x4166 progressive 4:4:4
    JPEG of 880 KB, drafted to 1500x521, took 290 MiB where the drafted size's estimate was 6.7 MiB.
    ``image`` is the opened JPEG (Pillow's ``layer``: each component's id, sampling and table)."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    wide, tall = max(layer[1] for layer in layers) or 1, max(layer[2] for layer in layers) or 1
    blocks = sum(-(-math.ceil(width * h / wide) // 8) * -(-math.ceil(height * v / tall) // 8) for _, h, v, _ in layers)
    return blocks * 64 * 2


class DecodeBudget:
    """``capacity`` bytes that concurrent decodes in this process share (see the module docstring)."""

    def __init__(self, capacity: int, *, wait_seconds: float = 2.0, retry_after: int = 1) -> None:
        if capacity <= 0:
            raise ValueError("a decode budget needs a positive capacity")
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self._used = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._changed:
            return self._used

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the block."""
        if nbytes > self.capacity:
            raise TooLargeToDecode(nbytes, self.capacity)
        deadline = time.monotonic() + self.wait_seconds
        with self._changed:
            while self._used + nbytes > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusy(self.retry_after)
                self._changed.wait(left)
            self._used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()
