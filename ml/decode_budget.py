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

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Bytes per pixel of each Pillow mode as decoded (before any conversion).
_NATIVE_BYTES = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "La": 2,
    "PA": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 4,
    "CMYK": 4,
    "I;16": 2,
    "I;16L": 2,
    "I;16B": 2,
    "I;16N": 2,
    "I": 4,
    "F": 4,
}


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


def estimate_peak_bytes(width: int, height: int, mode: str) -> int:
    """The most memory decoding a ``width`` x ``height`` image in Pillow ``mode`` holds at once.

    The decoded canvas, one full-size copy (EXIF transpose or a mode conversion) and the 8-bit RGB
    result; images with alpha add the RGBA canvas, the black background and the composite.
    """
    pixels = width * height
    native = _NATIVE_BYTES.get(mode, 4)
    peak = native * 2 + 3
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or mode.startswith("I"):
        peak += 4 * 3
    return pixels * peak


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
