"""ml.images: every InvalidImage code from generated files, and correct conversion of odd modes."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ml import images, jpeg_scans
from ml.decode_budget import DecodeBudget, TooLargeToDecode
from ml.images import ImageHeader, ImageLimits, InvalidImage, decode, decode_image, sniff_format
from tests.conftest import ROOT


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 8-bit RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def code_of(data: bytes, limits: ImageLimits | None = None, **kwargs: object) -> str:
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, limits or ImageLimits(), **kwargs)  # type: ignore[arg-type]
    assert caught.value.message and "\\x" not in caught.value.message
    return caught.value.code


def test_real_jpeg_decodes_to_rgb(jpeg_bytes: bytes) -> None:
    image = decode_image(jpeg_bytes)
    assert image.mode == "RGB"
    assert image.size == (300, 225)


def test_empty() -> None:
    assert code_of(b"") == "empty"


def test_text_named_jpg_is_unsupported() -> None:
    assert code_of(b"this is not an image, whatever its file name says\n" * 4) == "unsupported_format"


def test_gif_is_refused_by_name() -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(encode(Image.new("RGB", (64, 64)), "GIF"))
    assert caught.value.code == "unsupported_format"
    assert "GIF" in caught.value.message


def test_truncated_jpeg(jpeg_bytes: bytes) -> None:
    assert code_of(jpeg_bytes[: len(jpeg_bytes) * 2 // 3]) == "truncated"


def test_truncated_large_jpeg_is_caught_in_draft_mode() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=90)
    assert decode_image(data, reduce_to=200).size == (200, 150)
    assert code_of(data[: len(data) * 2 // 3], reduce_to=200) == "truncated"


def test_truncated_png() -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)), "PNG")
    assert code_of(data[: len(data) // 2]) == "truncated"


def test_garbage_after_jpeg_magic_is_corrupt() -> None:
    assert code_of(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8) in {"corrupt", "truncated"}


def test_png_with_bad_crc_is_corrupt() -> None:
    data = bytearray(encode(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    assert code_of(bytes(data)) == "corrupt"


def test_one_pixel_is_too_small() -> None:
    assert code_of(encode(Image.new("RGB", (1, 1)), "PNG")) == "too_small"


def test_small_png_declaring_30000_squared_is_a_bomb() -> None:
    data = png_declaring(30000, 30000)
    assert len(data) < 200
    assert code_of(data) == "decompression_bomb"


def repeated_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive ``jpeg`` with its last scan (and the Huffman table before it) written ``times``
    times more: still a JPEG libjpeg decodes (with a warning), each copy one more pass over every block."""
    last = jpeg.rindex(b"\xff\xda")
    table = jpeg.rfind(b"\xff\xc4", 0, last)
    start = table if table > jpeg.rfind(b"\xff\xda", 0, last) else last
    end = jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[start:end] * times + jpeg[end:]


def test_a_progressive_jpeg_repeating_a_scan_is_refused_before_its_pixels_decode() -> None:
    progressive = encode(Image.new("L", (2000, 2000), 128), "JPEG", progressive=True, quality=90)
    assert progressive.count(b"\xff\xda") > 1
    assert decode(repeated_scan(progressive, jpeg_scans.MAX_JPEG_SCANS - progressive.count(b"\xff\xda"))).image
    bomb = repeated_scan(progressive, 1000)
    assert len(bomb) < 100_000  # a small file that would take seconds to decode
    started = time.process_time()
    assert code_of(bomb) == "decompression_bomb"
    assert time.process_time() - started < 0.1  # refused by counting, not by decoding
    with pytest.raises(InvalidImage, match=r"the JPEG file has more than 64 scans; dermq decodes at most that many"):
        decode(bomb)
    # libjpeg skips bytes before a marker (a warning), and so does the count
    end = progressive.rindex(b"\xff\xd9")
    assert code_of(progressive[:end] + b"\x00\x17\xff" + bomb[end:]) == "decompression_bomb"


def test_scans_hidden_behind_a_marker_libjpeg_discards_inside_a_scan_are_counted() -> None:
    """In a scan, libjpeg discards a marker below 0xC0 and reads on, without a length. A walk that ended
    the scan there and skipped a "length" landed on an end marker hidden in a comment, and counted
    none of the 1,000 scans after it: 52 KB that decoded for 3 s. (Found by a review.)"""
    progressive = encode(Image.new("L", (2000, 2000), 128), "JPEG", progressive=True, quality=90)
    last = progressive.rindex(b"\xff\xda")
    table = progressive.rfind(b"\xff\xc4", 0, last)
    end = progressive.rindex(b"\xff\xd9")
    scan = progressive[table if table > progressive.rfind(b"\xff\xda", 0, last) else last : end]
    header = progressive[last : last + 2 + int.from_bytes(progressive[last + 2 : last + 4], "big")]
    restart_every = b"\xff\xdd\x00\x04\x00\x01"  # DRI: a restart interval of one MCU
    head = progressive[:end] + restart_every + header
    # the "length" after FF 02 points at the FF D9 inside the comment that follows the next DRI
    hidden = b"\xff\xdd\x00\x04\x00\x00" + b"\xff\xfe\x00\x08" + b"\x00\x00\xff\xd9\x00\x00"
    carrier = b"\xff\x02" + (2 + 6 + 4 + 2).to_bytes(2, "big")
    evasive = head + carrier + hidden + scan * 1000 + progressive[end:]
    assert jpeg_scans.walk(evasive).scans > jpeg_scans.MAX_JPEG_SCANS
    assert code_of(evasive) == "decompression_bomb"


def test_scans_after_a_stream_of_tables_only_are_counted() -> None:
    """An end marker before any scan ends a stream of tables only, after which libjpeg reads the image
    that follows (Pillow calls it again): the walk stopped there and counted no scan. (A review.)"""
    progressive = encode(Image.new("L", (2000, 2000), 128), "JPEG", progressive=True, quality=90)
    bomb = repeated_scan(progressive, 1000)
    for prefix in (b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\xfe\x00\x04ok\xff\xd9"):
        assert jpeg_scans.walk(prefix + bomb).scans > jpeg_scans.MAX_JPEG_SCANS
        assert code_of(prefix + bomb) == "decompression_bomb"


def test_a_file_of_markers_is_walked_briefly_and_refused() -> None:
    """Each marker outside a scan is a step of the walk in Python: 25 MiB of empty segments took 4 s."""
    for junk in (b"\xff\xe0\x00\x00", b"\xff\x01", b"\xff\xd8"):
        data = b"\xff\xd8" + junk * (2**21 // len(junk))
        started = time.process_time()
        assert jpeg_scans.walk(data).markers > jpeg_scans.MAX_JPEG_MARKERS
        assert time.process_time() - started < 0.1
        assert code_of(data) == "corrupt"
    # fill bytes between segments: libjpeg skips them in C, Pillow's header parse a byte at a time in Python
    plain = encode(Image.new("RGB", (256, 256), (90, 60, 40)), "JPEG")
    padded = plain[:20] + b"\xff" * 2**21 + plain[20:]
    assert plain[20] == 0xFF and jpeg_scans.walk(padded).stray > jpeg_scans.MAX_JPEG_STRAY_BYTES
    started = time.process_time()
    assert code_of(padded) == "corrupt"
    assert time.process_time() - started < 0.2


def test_a_run_of_fill_bytes_in_a_scan_and_arithmetic_coding_are_refused_before_decoding() -> None:
    """libjpeg's fill loop has no point where Pillow's feed can resume, so Pillow fed a long run of 0xFF
    in a scan's data again and again (25 MiB: 3 s for a 64x64 image); and arithmetic coding costs
    about ten times Huffman's a block and scan (64 scans of 2000x2000 from 1 MB: 0.9 s). (A review.)"""
    progressive = encode(Image.new("RGB", (64, 64), (90, 60, 40)), "JPEG", progressive=True)
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    before = progressive.rfind(b"\xff\xc4", 0, second)  # the next scan's table, if it has one
    at = before if before > progressive.index(b"\xff\xda") else second
    padded = progressive[:at] + b"\xff" * 2**20 + progressive[at:]
    started = time.process_time()
    assert jpeg_scans.walk(padded).stray > jpeg_scans.MAX_JPEG_STRAY_BYTES
    assert code_of(padded) == "corrupt"
    assert time.process_time() - started < 0.1
    baseline = encode(Image.new("RGB", (64, 64), (90, 60, 40)), "JPEG")
    arithmetic = baseline.replace(b"\xff\xc0", b"\xff\xc9", 1)  # SOF9: the same frame, arithmetic-coded
    assert jpeg_scans.walk(arithmetic).arithmetic and not jpeg_scans.walk(baseline).arithmetic
    assert code_of(arithmetic) == "unsupported_format"


def test_what_follows_a_jpegs_end_is_not_counted_as_its_scans(jpeg_bytes: bytes) -> None:
    """A phone's motion photo appends an MP4 to the JPEG: its bytes hold the scan marker's pair by
    chance (16 times a MiB), and counting them refused such photos as bombs."""
    motion = jpeg_bytes + np.random.default_rng(7).integers(0, 256, 5 * 2**20, dtype=np.uint8).tobytes()
    assert motion.count(b"\xff\xda") > jpeg_scans.MAX_JPEG_SCANS
    assert decode(motion).image.size == decode(jpeg_bytes).image.size


def test_long_thin_image_is_too_large() -> None:
    assert code_of(png_declaring(20000, 100)) == "too_large"


def test_byte_cap() -> None:
    assert code_of(b"\xff\xd8\xff" + b"\x00" * 2000, ImageLimits(max_bytes=1000)) == "file_too_large"


def test_load_truncated_images_switch_is_refused(jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(jpeg_bytes)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour() -> None:
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((32, 32))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = np.asarray(decode_image(data))
    assert image.shape == (64, 64, 3)
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255
    assert 120 <= image[0, 32, 0] <= 136  # mid-grey, not clipped to white


def test_palette_png_with_transparency_is_flattened() -> None:
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 32, 64))
    data = encode(palette, "PNG", transparency=0)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((10, 10)) == (0, 0, 0)
    assert image.getpixel((50, 10)) == (250, 10, 10)


def test_rgba_is_composited_on_black() -> None:
    rgba = Image.new("RGBA", (64, 64), (200, 100, 50, 0))
    rgba.paste((200, 100, 50, 255), (32, 0, 64, 64))
    image = decode_image(encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((40, 0)) == (200, 100, 50)


def test_grayscale_becomes_three_equal_channels() -> None:
    image = decode_image(encode(Image.new("L", (64, 64), 77), "JPEG"))
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (77, 77, 77)


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (80, 40), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image = decode_image(encode(source, "JPEG", exif=exif, quality=95))
    assert image.size == (40, 80)
    top = image.getpixel((20, 10))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "BMP"])
def test_other_accepted_formats(fmt: str) -> None:
    image = decode_image(encode(Image.new("RGB", (48, 40), (1, 2, 3)), fmt))
    assert image.size == (48, 40) and image.mode == "RGB"


def test_a_jpeg_with_a_multi_picture_section_is_read_as_its_first_picture() -> None:
    # phone cameras store depth maps and Ultra HDR gain maps as further pictures after the photograph
    photo, extra = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (32, 24), (0, 0, 255))
    buffer = io.BytesIO()
    photo.save(buffer, format="MPO", save_all=True, append_images=[extra])
    decoded = decode(buffer.getvalue())
    assert decoded.format == "JPEG" and decoded.image.size == (64, 48)
    assert np.abs(np.asarray(decoded.image, dtype=int) - (200, 30, 30)).max() <= 3


def test_format_allow_list_is_honoured() -> None:
    data = encode(Image.new("RGB", (48, 40)), "BMP")
    assert code_of(data, ImageLimits(formats=frozenset({"JPEG", "PNG"}))) == "unsupported_format"


def test_polyglot_is_read_as_its_magic_format_only(jpeg_bytes: bytes) -> None:
    # A JPEG with a PNG appended still decodes as the JPEG it starts with; a PNG magic followed by
    # JPEG data is refused rather than reinterpreted.
    png = encode(Image.new("RGB", (64, 64)), "PNG")
    assert decode_image(jpeg_bytes + png).size == (300, 225)
    assert code_of(b"\x89PNG\r\n\x1a\n" + jpeg_bytes) in {"corrupt", "truncated"}


def test_sniffing() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"II*\x00") == sniff_format(b"MM\x00*") == "TIFF"
    assert sniff_format(b"<svg") is None


def test_draft_mode_keeps_the_requested_size() -> None:
    big = encode(Image.new("RGB", (4000, 3000), (90, 60, 50)), "JPEG")
    assert decode_image(big, reduce_to=1000).size == (1000, 750)
    assert decode_image(big, reduce_to=1024).size == (2000, 1500)  # 1/4 scale would fall short
    assert decode_image(big, reduce_to=256).size == (500, 375)
    assert decode_image(big).size == (4000, 3000)


def test_decoding_needs_neither_numpy_nor_torch() -> None:
    code = "import sys, ml.images, ml.labels; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP", "BMP"])
def test_the_header_is_told_before_the_pixels_and_is_what_the_decode_reports(fmt: str) -> None:
    """The intake stores a camera image's case from ``on_header`` while the pixels decode: it must
    come with the decode's memory reserved, and say what the decode then reports, EXIF turn included."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: decoded upright as 40x64
    params = {"exif": exif} if fmt in ("JPEG", "PNG", "TIFF", "WEBP") else {}
    data = encode(Image.new("RGB", (64, 40), (150, 90, 80)), fmt, **params)
    budget = DecodeBudget(64 * 2**20)
    told: list[tuple[ImageHeader, int]] = []
    decoded = decode(data, budget=budget, on_header=lambda header: told.append((header, budget.in_use)))
    [(header, reserved)] = told
    assert header == decoded.header and reserved > 0 and budget.in_use == 0
    if fmt == "JPEG":
        assert (header.width, header.height) == (64, 40) and decoded.image.size == (40, 64)


def test_nothing_is_told_of_an_upload_refused_before_its_pixels(jpeg_bytes: bytes) -> None:
    told: list[ImageHeader] = []
    for data in (b"", b"MRN 0042\n" * 8, png_declaring(30000, 30000), encode(Image.new("RGB", (4, 4)), "PNG")):
        with pytest.raises(InvalidImage):
            decode(data, on_header=told.append)
    with pytest.raises(TooLargeToDecode):
        decode(jpeg_bytes, budget=DecodeBudget(1024), on_header=told.append)
    assert told == []


def test_a_file_cut_short_is_told_by_its_header_and_refused_by_its_decode(jpeg_bytes: bytes) -> None:
    """Only the decode finds a file cut short: the intake commits nothing before its decode has ended."""
    told: list[ImageHeader] = []
    with pytest.raises(InvalidImage) as refused:
        decode(jpeg_bytes[: len(jpeg_bytes) // 2], on_header=told.append)
    assert refused.value.code == "truncated" and told == [ImageHeader("JPEG", 300, 225)]


def test_memory_the_process_lacks_and_the_callers_own_errors_are_not_a_damaged_file(
    jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError while decoding is this process's, not the file's: it used to come out as
    ``corrupt``, and the clinic was told its image was damaged. A caller's own errors (a worker's soft
    time limit) come out as they are too; anything else raised inside is still a malformed file."""

    class Stopped(Exception):
        pass

    def raising(error: type[BaseException]):  # type: ignore[no-untyped-def]
        def load(*args: object) -> None:
            raise error

        return load

    monkeypatch.setattr(images, "_load_rgb", raising(MemoryError))
    with pytest.raises(MemoryError):
        decode(jpeg_bytes)
    monkeypatch.setattr(images, "_load_rgb", raising(Stopped))
    with pytest.raises(Stopped):
        decode(jpeg_bytes, passthrough=(Stopped,))
    with pytest.raises(InvalidImage) as refused:
        decode(jpeg_bytes)
    assert refused.value.code == "corrupt"
