"""JPEG segments that Pillow's header parse reads a value at a time in Python (frame headers,
quantization tables, Photoshop resources, EXIF segments) are counted before Pillow opens the file, and
a flood of them is refused; files with as many as real software writes still decode. Each flood was
found by a review: 25 MiB of them took the intake 1.3 to 7 s (a real 22 MiB photo: 0.2 s)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest
from PIL import Image

from ml import jpeg_scans
from ml.images import InvalidImage, decode
from tests.ml.test_images import code_of, encode

LIMIT = 25 * 1024 * 1024
PLAIN = encode(Image.new("RGB", (600, 450), (180, 120, 100)), "JPEG")


def segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def frame(jpeg: bytes, components: int) -> bytes:
    """``jpeg``'s frame header (SOF0) followed by ``components`` more three-byte component entries
    than it says it has: Pillow makes each one a component, libjpeg reads the ones it declares."""
    at = jpeg.index(b"\xff\xc0")
    header = jpeg[at + 4 : at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")]
    return segment(0xC0, header + b"\x01\x11\x00" * components)


def tables(count: int) -> bytes:
    """A DQT segment of ``count`` 8-bit quantization tables (all numbered 0: each replaces the last)."""
    return segment(0xDB, (b"\x00" + bytes(range(1, 65))) * count)


def photoshop(resources: int) -> bytes:
    """An APP13 segment of ``resources`` empty Photoshop image resources."""
    return segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00\x00\x00\x00\x00" * resources)


def exif() -> bytes:
    return segment(0xE1, b"Exif\x00\x00" + bytes(65000))


def with_segments(jpeg: bytes, segments: list[bytes]) -> bytes:
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def flooded(jpeg: bytes, make: Callable[[], bytes]) -> bytes:
    """``jpeg`` with as many copies of a segment as fit in the upload limit."""
    one = make()
    return with_segments(jpeg, [one] * ((LIMIT - len(jpeg)) // len(one)))


FLOODS = {
    "frame headers": lambda: frame(PLAIN, 21000),
    "quantization tables": lambda: tables(1000),
    "photoshop resources": lambda: photoshop(5000),
    "exif segments": exif,
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_a_jpeg_flooded_with_segments_pillow_parses_in_python_is_refused_at_once(kind: str) -> None:
    bomb = flooded(PLAIN, FLOODS[kind])
    assert len(bomb) <= LIMIT
    started = time.process_time()
    with pytest.raises(InvalidImage, match="more frame headers, quantization tables, Photoshop resources") as caught:
        decode(bomb)
    assert caught.value.code == "corrupt"
    assert time.process_time() - started < 0.2  # refused by counting, not by parsing (before: 1.3-7 s)


def test_as_many_as_real_software_writes_still_decode() -> None:
    # one frame of 15 bytes (three components), two tables of 65 bytes
    assert jpeg_scans.walk(PLAIN).parsed == jpeg_scans.Parsed(frames=15, tables=130)
    # every other count at its limit: 64 KiB of tables (with the file's own two), 4,096 Photoshop
    # resources in two segments, 16 EXIF segments
    full = [tables(1006), photoshop(4000), photoshop(96), *[exif()] * jpeg_scans.MAX_EXIF_SEGMENTS]
    started = time.process_time()
    at_limits = with_segments(PLAIN, full)
    assert jpeg_scans.walk(at_limits).parsed == jpeg_scans.Parsed(15, 65520, 4096, 16)
    assert decode(at_limits).image.size == (600, 450)
    assert time.process_time() - started < 0.2
    for one_more in (frame(PLAIN, 340), tables(1), photoshop(1), exif()):
        assert code_of(with_segments(PLAIN, [*full, one_more])) == "corrupt"


def test_segments_after_the_first_scan_are_not_counted() -> None:
    """Pillow's header parse stops at the first scan; libjpeg reads what follows in C."""
    progressive = encode(Image.new("RGB", (64, 64), (90, 60, 40)), "JPEG", progressive=True)
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    between = progressive[:second] + photoshop(5000) * 2 + progressive[second:]
    assert jpeg_scans.walk(between).parsed == jpeg_scans.walk(progressive).parsed
    assert decode(between).image.size == (64, 64)
