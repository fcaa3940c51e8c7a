"""The decode budget: concurrent decodes share one bound on decoded bytes, and lossless canvases have
their own pixel cap, checked from the header before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ml.decode_budget import DecodeBudget, DecodeBusy, TooLargeToDecode, estimate_for, estimate_peak_bytes
from ml.images import ImageLimits, InvalidImage, decode

ROOT = Path(__file__).resolve().parents[2]


def png_header_only(width: int, height: int, colour_type: int = 6) -> bytes:
    """A PNG that declares ``width`` x ``height`` (RGBA by default) and holds one tiny IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (120, 80, 60, 255)[: len(mode)]).save(out, "PNG")
    return out.getvalue()


def test_a_lossless_canvas_over_its_cap_is_refused_before_decoding() -> None:
    # 7000x7000 RGBA: under the 50-megapixel cap that JPEG gets, over the lossless one.
    data = png_header_only(7000, 7000)
    assert len(data) < 200
    with pytest.raises(InvalidImage) as refused:
        decode(data, ImageLimits())
    assert refused.value.code == "decompression_bomb"
    assert "for PNG" in refused.value.message and "25 megapixels" in refused.value.message


def test_from_settings_never_lets_the_lossless_cap_exceed_the_general_one() -> None:
    class Bounds:
        max_upload_bytes, max_image_side, max_image_pixels, max_lossless_pixels, min_image_side = (
            10**6,
            9000,
            10**6,
            10**7,
            32,
        )

    limits = ImageLimits.from_settings(Bounds())
    assert limits.max_lossless_pixels == 10**6 and limits.max_pixels == 10**6


def test_an_image_whose_decoding_would_exceed_the_whole_budget_is_refused() -> None:
    data = png(1000, 1000, "RGBA")
    needed = estimate_for(Image.open(io.BytesIO(data)), "PNG")
    assert needed >= estimate_peak_bytes(1000, 1000, "RGBA")
    budget = DecodeBudget(needed - 1)
    with pytest.raises(TooLargeToDecode):
        decode(data, budget=budget)
    assert budget.in_use == 0
    assert decode(data, budget=DecodeBudget(needed)).image.size == (1000, 1000)


def test_estimates_cover_what_alpha_compositing_holds() -> None:
    assert estimate_peak_bytes(100, 100, "RGBA") > estimate_peak_bytes(100, 100, "RGB")
    assert estimate_peak_bytes(100, 100, "P", transparency=True) > estimate_peak_bytes(100, 100, "RGBA")
    assert estimate_peak_bytes(7000, 7000, "RGBA") > 1_000_000_000  # the 190 KB PNG of the security review


def test_a_damaged_png_decoded_under_a_budget_is_refused_not_returned_half_decoded() -> None:
    # rows 100 on carry an undefined PNG filter type: Pillow stops there and raises. The estimate must
    # not look at the image in a way that decodes it first and swallows that error.
    width, height = 200, 200
    rows = b"".join((b"\x07" if y >= 100 else b"\x00") + bytes([y % 256]) * (width * 3) for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    for budget in (None, DecodeBudget(10**9)):
        with pytest.raises(InvalidImage):
            decode(data, budget=budget)


def test_a_tiny_palette_png_with_a_transparent_colour_is_priced_as_the_rgba_it_becomes() -> None:
    # 5000x5000, about 30 KB: decoding goes through RGBA and its compositing, about 25 bytes a pixel
    out = io.BytesIO()
    Image.new("P", (5000, 5000)).save(out, "PNG", transparency=0)
    assert len(out.getvalue()) < 100_000
    budget = DecodeBudget(384 * 2**20)  # the default DERMQ_DECODE_MEMORY_BYTES
    with pytest.raises(TooLargeToDecode):
        decode(out.getvalue(), budget=budget)
    assert budget.in_use == 0


_MEASURE = """
import io, json, sys
from PIL import Image, ImageCms
from ml.decode_budget import DecodeBudget, estimate_for
from ml.images import decode

def status(name):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(name))

mode, fmt, turned, extra = sys.argv[1], sys.argv[2], sys.argv[3] == "turned", json.loads(sys.argv[4])
reduce_to = extra.pop("reduce_to", None)  # decoded as the intake does (a JPEG's draft)
base = Image.radial_gradient("L").resize((2000, 2000)).convert("RGB")
if turned:
    exif = Image.Exif()
    exif[0x0112] = 6
    extra |= {"exif": exif.tobytes(), "icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}
out = io.BytesIO()
(base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")).save(out, fmt, **extra)
data = out.getvalue()
del base, out
class Recorded(DecodeBudget):
    def reserve(self, nbytes):
        self.reserved = nbytes  # what the decode reserves: the estimate, and what a JPEG's scans hold
        return super().reserve(nbytes)

budget = Recorded(10**10)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak resident size starts again from now
before = status("VmRSS:")
decoded = decode(data, budget=budget, reduce_to=reduce_to)
print(status("VmHWM:") - before, budget.reserved)
"""

KINDS = [
    ("RGB", "JPEG", "plain", "{}"),
    ("RGB", "JPEG", "turned", "{}"),
    ("CMYK", "JPEG", "plain", "{}"),
    ("RGB", "PNG", "turned", "{}"),
    ("RGBA", "PNG", "plain", "{}"),
    ("RGBA", "PNG", "turned", "{}"),
    ("LA", "PNG", "plain", "{}"),
    ("P", "PNG", "plain", '{"transparency": 0}'),
    ("P", "PNG", "plain", "{}"),
    ("1", "PNG", "plain", "{}"),
    ("I;16", "PNG", "plain", "{}"),
    ("RGB", "WEBP", "turned", "{}"),
    ("RGB", "TIFF", "plain", "{}"),
    # every coefficient of the declared size, whatever scale the draft decodes at (a 12000x4166 file
    # of 880 KB reserved 6.7 MiB and held 290)
    ("RGB", "JPEG", "plain", '{"progressive": true, "subsampling": 0, "reduce_to": 256}'),
    ("RGB", "JPEG", "plain", '{"progressive": true, "subsampling": 2}'),
    ("L", "JPEG", "plain", '{"progressive": true, "reduce_to": 256}'),
]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux's /proc")
@pytest.mark.parametrize(
    "kind",
    KINDS,
    ids=[
        "-".join(k[:3])
        + ("-t" if "transp" in k[3] else "")
        + ("-progressive" if "progr" in k[3] else "")
        + ("-drafted" if "reduce" in k[3] else "")
        for k in KINDS
    ],
)
def test_the_estimate_covers_the_memory_decoding_holds(kind: tuple[str, str, str, str]) -> None:
    # the peak resident memory of decoding a 2000x2000 image under a budget, in a fresh process
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, *kind], capture_output=True, text=True, timeout=60, check=True
    )
    peak, reserved = map(int, run.stdout.split())
    assert peak > 2000 * 2000 * (1 if "reduce_to" not in kind[3] else 0.5)  # measured: the canvas, or the coefficients
    assert peak <= reserved


def test_a_reservation_that_does_not_fit_waits_for_one_to_end() -> None:
    budget = DecodeBudget(100, wait_seconds=5)
    released = threading.Event()

    def hold() -> None:
        with budget.reserve(80):
            released.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    deadline = time.monotonic() + 10
    while budget.in_use != 80:  # the holder's reservation
        assert time.monotonic() < deadline and holder.is_alive(), "the first reservation was not made"
        time.sleep(0.01)
    threading.Timer(0.2, released.set).start()
    started = time.monotonic()
    with budget.reserve(50):
        assert budget.in_use == 50
    assert time.monotonic() - started >= 0.15
    holder.join()
    assert budget.in_use == 0


def test_a_reservation_gives_up_with_retry_after_when_the_budget_stays_full() -> None:
    budget = DecodeBudget(100, wait_seconds=0.1, retry_after=3)
    with budget.reserve(60):
        with pytest.raises(DecodeBusy) as busy, budget.reserve(60):
            pass
        assert busy.value.retry_after == 3
        with budget.reserve(40):  # what fits is not held back
            assert budget.in_use == 100
    assert budget.in_use == 0


def test_a_failed_decode_releases_its_reservation() -> None:
    good = png(300, 300)
    truncated = good[: len(good) // 2]
    budget = DecodeBudget(10**8)
    with pytest.raises(InvalidImage):
        decode(truncated, budget=budget)
    assert budget.in_use == 0
