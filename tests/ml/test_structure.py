"""Uploads whose structure costs far more to open or decode than their pixels are refused before Pillow
opens them (ml.structure), and colour profiles slow to apply are ignored (ml.srgb); files like them
that real software writes still decode. Each hostile file was found by a review, with its cost there."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
from PIL import Image, ImageCms

from ml import srgb
from ml.images import decode
from tests.ml.test_images import code_of, encode, png_chunk


def tiff_with_strips(
    offsets: int, side: int = 32, *, rows: int | None = None, more: tuple = (), leading: tuple = ()
) -> bytes:
    """A ``side`` x ``side`` greyscale TIFF whose StripOffsets holds ``offsets`` entries, all pointing at
    its one strip (a million took 4.5 s and 237 MiB in ``Image.open``); ``rows`` a strip (default all),
    ``more`` entries appended to its directory, ``leading`` entries put first."""
    pixels = bytes(side * side)
    array = struct.pack(f"<{offsets}I", *([8] * offsets))
    ifd_at = 8 + len(pixels) + len(array)
    entries = [
        *leading,
        (256, 3, 1, side),
        (257, 3, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, offsets, 8 if offsets == 1 else 8 + len(pixels)),
        (277, 3, 1, 1),
        (278, 4, 1, rows or side),
        (279, 4, 1, side * side),
        *more,
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", ifd_at) + pixels + array + ifd


def test_a_tiff_whose_offsets_outnumber_its_strips_or_whose_tags_hold_floods_is_refused(jpeg_bytes: bytes) -> None:
    flood = tiff_with_strips(100_000)
    started = time.process_time()
    assert code_of(flood) == "corrupt"
    assert time.process_time() - started < 0.05
    assert decode(tiff_with_strips(1)).image.size == (32, 32)  # the same file with its one offset
    rationals = bytearray(encode(Image.new("L", (64, 64), 9), "TIFF", dpi=(300, 300)))
    at = struct.unpack_from("<I", rationals, 4)[0]
    for i in range(struct.unpack_from("<H", rationals, at)[0]):  # XResolution: 500,000 rationals
        if struct.unpack_from("<H", rationals, at + 2 + 12 * i)[0] == 282:
            struct.pack_into("<I", rationals, at + 6 + 12 * i, 500_000)
    assert code_of(bytes(rationals)) == "corrupt"
    # a second ImageLength: Pillow keeps the first (32 rows: 32 strips), so must the check
    repeated = tiff_with_strips(1_000, rows=1, more=((257, 4, 1, 1_000_000),))
    assert code_of(repeated) == "corrupt"
    # a StripOffsets of no values first: Pillow skips a copy it cannot use and keeps the next (400,000
    # offsets for 32 strips took 5.2 s and 104 MiB); the check read the empty one
    assert code_of(tiff_with_strips(1_000, rows=1, leading=((273, 4, 0, 0), (279, 4, 0, 0)))) == "corrupt"
    # a directory that declares more entries than the file holds: Pillow keeps those it could read
    short = bytearray(tiff_with_strips(1_000, rows=1))
    at = struct.unpack_from("<I", short, 4)[0]
    struct.pack_into("<H", short, at, struct.unpack_from("<H", short, at)[0] + 8)
    assert code_of(bytes(short)) == "corrupt"
    # a forged height that would allow millions of strips is refused for its size before Pillow opens it
    tall = tiff_with_strips(1, rows=1, more=())
    tall_header = bytearray(tall)
    at = struct.unpack_from("<I", tall_header, 4)[0]
    struct.pack_into("<HHII", tall_header, at + 2 + 12, 257, 4, 1, 4_000_000)
    started = time.process_time()
    assert code_of(bytes(tall_header)) in ("too_large", "decompression_bomb")
    assert time.process_time() - started < 0.05
    lesion = Image.open(io.BytesIO(jpeg_bytes))
    for written in (encode(lesion, "TIFF"), encode(lesion.resize((900, 700)), "TIFF", compression="tiff_lzw")):
        assert decode(written).image.mode == "RGB"  # Pillow's own strips, as many as it says


def test_a_png_flooding_chunks_or_colour_profiles_is_refused() -> None:
    plain = encode(Image.new("RGB", (64, 64), (90, 60, 40)), "PNG")
    profile = png_chunk(
        b"iCCP", b"p\x00\x00" + zlib.compress(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    )
    two_profiles = plain[:33] + profile + profile + plain[33:]
    assert code_of(two_profiles) == "corrupt"
    assert decode(plain[:33] + profile + plain[33:]).image.size == (64, 64)  # one is what a PNG may have
    private = plain[:33] + png_chunk(b"zzZz", b"") * 70_000 + plain[33:]
    started = time.process_time()
    assert code_of(private) == "corrupt"  # 2.18 million of them took 4.7 s and 252 MiB
    assert time.process_time() - started < 0.2
    text = encode(Image.new("RGB", (64, 64), (90, 60, 40)), "PNG", pnginfo=_text(300))  # one a DICOM element
    assert decode(text).image.size == (64, 64)


def _text(chunks: int) -> object:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for i in range(chunks):
        info.add_text(f"key{i}", "value")
    return info


def test_a_run_length_encoded_bmp_is_refused_and_a_plain_one_decodes() -> None:
    plain = encode(Image.new("RGB", (64, 48), (90, 60, 40)), "BMP")
    assert decode(plain).image.size == (64, 48)
    rle8 = bytearray(encode(Image.new("P", (64, 48)), "BMP"))
    struct.pack_into("<I", rle8, 30, 1)  # BI_RLE8: decoded in Python a step a pixel (5000x5000: 3.1 s)
    assert code_of(bytes(rle8)) == "unsupported_format"


def with_tag(icc: bytes, signature: bytes, body: bytes) -> bytes:
    """``icc`` with one more tag, ``signature`` holding ``body``, appended."""
    count = int.from_bytes(icc[128:132], "big")
    entries = [icc[132 + 12 * i : 144 + 12 * i] for i in range(count)]
    moved = [e[:4] + (int.from_bytes(e[4:8], "big") + 12).to_bytes(4, "big") + e[8:] for e in entries]
    added = signature + (len(icc) + 12).to_bytes(4, "big") + len(body).to_bytes(4, "big")
    out = icc[:128] + (count + 1).to_bytes(4, "big") + b"".join(moved) + added + icc[132 + 12 * count :] + body
    return len(out).to_bytes(4, "big") + out[4:]


def test_a_colour_profile_slow_to_apply_is_ignored_and_the_pixels_taken_as_srgb() -> None:
    """A profile whose curves are evaluated segment by segment in floating point (DToB tags,
    multi-process elements): one of 20,000 segments in a 1 KB PNG took 6.9 s to convert."""
    standard = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert not srgb._slow_to_apply(standard)
    for signature, body in ((b"D2B0", b"mpet" + bytes(12)), (b"desc", b"mpet" + bytes(12))):
        slow = with_tag(standard, signature, body)
        assert srgb._slow_to_apply(slow), signature
        pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        decoded = decode(encode(Image.fromarray(pixels), "PNG", icc_profile=slow)).image
        assert np.array_equal(np.asarray(decoded), pixels)  # not converted: the profile was not applied


def tiff_with_sub_directory(pointer: int, values: int, kind: int = 5, *, interop: bool = False) -> bytes:
    """:func:`tiff_with_strips`'s 32x32 TIFF whose first directory points (tag ``pointer``: EXIF 34665 or
    GPS 34853) at a directory holding one private tag of ``values`` values of TIFF type ``kind``; with
    ``interop``, at an EXIF directory that points (40965, named in the first directory too, as Pillow
    wants) at that one. Pillow's TIFF loader makes every value of those directories a Python object at
    the end of each decode: 3,000,000 rationals (a 24 MB file) took 9.8 s and 850 MiB."""
    extra = ((40965, 4, 1, 0),) if interop else ()
    size = len(tiff_with_strips(1, more=((pointer, 4, 1, 0), *extra)))
    plain = tiff_with_strips(1, more=((pointer, 4, 1, size), *extra))
    unit = {3: 2, 4: 4, 5: 8, 6: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}[kind]
    hops = [(40965, 4, 1, size + 18)] if interop else []  # the EXIF directory first, 18 bytes long
    directories = b"".join(struct.pack("<H", 1) + struct.pack("<HHII", *hop) + bytes(4) for hop in hops)
    last = size + len(directories)
    flood = struct.pack("<H", 1) + struct.pack("<HHII", 0xC000, kind, values, last + 18) + bytes(4)
    return plain + directories + flood + bytes(values * unit)


def test_a_tiff_whose_exif_or_gps_directory_holds_a_flood_of_values_is_refused() -> None:
    # every type Pillow unpacks a value at a time (SBYTE, 6, was not counted: 20,000,000 of them took
    # 1.4 s and 359 MiB), in the EXIF directory; SHORTs in the GPS one; rationals behind interoperability
    every_type = tuple((34665, kind, False) for kind in (3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16))
    for pointer, kind, interop in (*every_type, (34853, 3, False), (34665, 5, True)):
        flood = tiff_with_sub_directory(pointer, 400_000, kind, interop=interop)
        started = time.process_time()
        assert code_of(flood) == "corrupt", (pointer, kind, interop)
        assert time.process_time() - started < 0.05
        assert decode(tiff_with_sub_directory(pointer, 16, kind, interop=interop)).image.size == (32, 32)
    # a damaged pointer lands on junk: values past the file's end, which Pillow skips (metadata only)
    size = len(tiff_with_strips(1, more=((34665, 4, 1, 0),)))
    junk = struct.pack("<H", 600) + b"".join(struct.pack("<HHII", i, 5, 10**9, 8) for i in range(600))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's, a tag at a time
        assert decode(tiff_with_strips(1, more=((34665, 4, 1, size),)) + junk + bytes(4)).image.size == (32, 32)
    exif = Image.Exif()
    exif.get_ifd(0x8769).update({0x9003: "2024:05:01 10:00:00", 0x829A: 0.01, 0x920A: 50.0})
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 8.0, 30.0)})
    written = encode(Image.new("RGB", (64, 48), (90, 60, 40)), "TIFF", exif=exif)
    assert decode(written).image.size == (64, 48)  # a camera's EXIF and GPS directories decode as before
