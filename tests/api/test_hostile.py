"""A corpus of hostile files and requests: each gets a 4xx with a clear code and leaves nothing
stored; whatever the intake does accept, the worker classifies without crashing or hanging."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests import support
from tests.api.test_cases import rows_for, wait_done
from tests.ml.test_images import encode, png_chunk, png_declaring, repeated_scan
from tests.ml.test_jpeg_segments import photoshop, with_segments
from tests.ml.test_structure import tiff_with_sub_directory

pytestmark = pytest.mark.usefixtures("database")


def tiff_declaring(width: int, height: int) -> bytes:
    """A small real TIFF whose ImageWidth/ImageLength tags were rewritten to claim a huge image."""
    data = bytearray(encode(Image.new("L", (16, 16), 9), "TIFF"))
    assert data[:2] == b"II"
    offset = struct.unpack_from("<I", data, 4)[0]
    (count,) = struct.unpack_from("<H", data, offset)
    for i in range(count):
        entry = offset + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<HHII", data, entry, tag, 4, 1, value) if kind == 4 else struct.pack_into(
                "<HHIHH", data, entry, tag, 3, 1, value, 0
            )
    return bytes(data)


def jpeg_declaring(width: int, height: int, jpeg: bytes) -> bytes:
    """A real JPEG whose SOF0 frame header claims other dimensions."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def zlib_bomb_png(side: int) -> bytes:
    """A PNG of ``side`` x ``side`` black pixels: megabytes of pixels in a few kilobytes of file."""
    raw = (b"\x00" + b"\x00" * side * 3) * side
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


HOSTILE_FILES = {
    "png bomb (declared 30000x30000)": (lambda j: png_declaring(30000, 30000), 422, "decompression_bomb"),
    "png zlib bomb (9000x9000 of zeros)": (lambda j: zlib_bomb_png(9000), 422, "decompression_bomb"),
    "gif bomb (65535x65535)": (lambda j: gif_declaring(65535, 65535), 415, "unsupported_format"),
    "tiff bomb (60000x60000)": (lambda j: tiff_declaring(60000, 60000), 422, "decompression_bomb"),
    "tiff whose exif directory holds 400,000 rationals": (
        lambda j: tiff_with_sub_directory(34665, 400_000),
        422,
        "corrupt",
    ),
    "jpeg claiming 65000x65000": (lambda j: jpeg_declaring(65000, 65000, j), 422, "decompression_bomb"),
    "jpeg claiming 20000x40": (lambda j: jpeg_declaring(20000, 40, j), 422, "too_large"),
    "progressive jpeg repeating a scan 1,000 times": (
        lambda j: repeated_scan(encode(Image.open(io.BytesIO(j)), "JPEG", progressive=True), 1000),
        422,
        "decompression_bomb",
    ),
    "jpeg with 10,000 photoshop resources (25 MiB of them: 4 s in Pillow's header parse)": (
        lambda j: with_segments(j, [photoshop(5000)] * 2),
        422,
        "corrupt",
    ),
    "truncated jpeg": (lambda j: j[: len(j) * 2 // 3], 422, "truncated"),
    "truncated png": (
        lambda j: encode(
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG"
        )[:900],
        422,
        "truncated",
    ),
    "png magic then html": (lambda j: b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>" * 3, 422, "corrupt"),
    "html named jpg": (lambda j: b"<!doctype html><script>alert(1)</script>", 415, "unsupported_format"),
    "pdf": (lambda j: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", 415, "unsupported_format"),
    "svg": (
        lambda j: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        415,
        "unsupported_format",
    ),
    "zero bytes": (lambda j: b"", 422, "empty"),
    "one pixel": (lambda j: encode(Image.new("RGB", (1, 1)), "PNG"), 422, "too_small"),
    "jpeg header only": (lambda j: j[:300], 422, "truncated"),
}


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_hostile_files(client, tenant, settings, jpeg_bytes: bytes, name: str) -> None:  # type: ignore[no-untyped-def]
    make, status, code = HOSTILE_FILES[name]
    response = client.post(
        "/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", make(jpeg_bytes), "image/jpeg")}
    )
    assert (response.status_code, response.json().get("code")) == (status, code), response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    assert rows_for(settings, tenant.clinic_id) == {"cases": 0, "blobs": 0, "case_events": 0}


def _post(client, tenant, body: bytes, content_type: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/cases", headers={**tenant.headers, "Content-Type": content_type}, content=body)


def _duplicate_priority(image: bytes) -> tuple[bytes, str]:
    body, content_type = support.multipart(image, fields={"priority": "urgent"})
    field = b'--dermqtestboundary\r\nContent-Disposition: form-data; name="priority"\r\n\r\nroutine\r\n'
    return field + body, content_type


def test_hostile_requests(client, tenant, settings, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    boundary = "hostileboundary"
    many_images = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + jpeg_bytes
            + b"\r\n"
            for i in range(20)
        )
        + f"--{boundary}--\r\n".encode()
    )
    many_fields = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode() for i in range(50)
        )
        + f"--{boundary}--\r\n".encode()
    )
    huge_field, ct = support.multipart(jpeg_bytes, fields={"client_ref": "A" * 2_000_000}, boundary=boundary)
    # cut short: never read as the parts that arrived (an urgent case queued as routine, a cut image "empty")
    image_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + jpeg_bytes
        + b"\r\n"
    )
    no_closing_boundary = (
        image_part + f'--{boundary}\r\nContent-Disposition: form-data; name="priority"\r\n\r\nurgent'.encode()
    )
    whole, _ = support.multipart(jpeg_bytes, boundary=boundary)
    nameless = f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    # the boundary over and over inside the image: each cost the parser 25 us of the event loop (3 s a 25 MB body)
    inside, _ = support.multipart(b"\r\n--Xa" * 40_000, boundary="X")
    cases = [
        ("20 images in one body", many_images, f"multipart/form-data; boundary={boundary}", 422, "too_many_files"),
        ("50 fields", many_fields, f"multipart/form-data; boundary={boundary}", 422, "unexpected_field"),
        ("2 MB text field", huge_field, ct, 422, "field_too_large"),
        ("no boundary", b"--x\r\n", "multipart/form-data", 400, "invalid_multipart"),
        ("garbage body", b"\x00\x01\x02" * 100, f"multipart/form-data; boundary={boundary}", 400, "invalid_multipart"),
        ("json body", b'{"image": "aGVsbG8="}', "application/json", 415, "expected_multipart"),
        (
            "image as plain text",
            *support.multipart(jpeg_bytes, content_type="text/plain"),
            415,
            "unsupported_media_type",
        ),
        ("html part", *support.multipart(b"<html>", content_type="text/html"), 415, "unsupported_media_type"),
        ("path in filename", *support.multipart(jpeg_bytes, filename="../../etc/passwd"), 422, "invalid_filename"),
        ("windows path", *support.multipart(jpeg_bytes, filename="C:\\Windows\\win.ini"), 422, "invalid_filename"),
        ("duplicate field", *_duplicate_priority(jpeg_bytes), 422, "duplicate_field"),
        ("no closing boundary", no_closing_boundary, ct, 400, "incomplete_body"),
        ("cut in the image", whole[: len(whole) // 2], ct, 400, "incomplete_body"),
        ("cut after the image", image_part, ct, 400, "incomplete_body"),
        ("a part without a name", nameless, ct, 422, "unexpected_field"),
        ("the boundary inside a part", inside, "multipart/form-data; boundary=X", 400, "invalid_multipart"),
    ]
    for name, body, content_type, status, code in cases:
        response = _post(client, tenant, body, content_type)
        assert (response.status_code, response.json().get("code")) == (status, code), (name, response.text[:300])
        assert "None" not in response.json()["detail"], (name, response.json())
    # the case's fields belong to the form: in the query they would be ignored (an urgent case routine)
    body, content_type = support.multipart(jpeg_bytes)
    misplaced = client.post(
        "/v1/cases?priority=urgent&wait=0",
        headers={**tenant.headers, "Content-Type": content_type},
        content=body,
    )
    assert (misplaced.status_code, misplaced.json()["code"]) == (422, "unknown_parameter"), misplaced.text
    assert "priority" in misplaced.json()["detail"]
    response = client.post(
        "/v1/cases",
        headers={**tenant.headers, "Content-Length": "99999999999"},
        content=b"x",
    )
    assert response.status_code in (400, 413, 415)
    assert rows_for(settings, tenant.clinic_id) == {"cases": 0, "blobs": 0, "case_events": 0}


def test_a_part_naming_its_disposition_or_type_twice_is_refused(client, tenant, settings, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    """Which of a part's two Content-Disposition (or Content-Type) headers counts is nobody's rule: the
    intake kept the last, so a part that first named the image and then the priority queued an urgent
    case, where a proxy's or the portal's own parser reading the first saw an image."""
    boundary = "twiceboundary"
    image = b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
    priority = b'Content-Disposition: form-data; name="priority"\r\n'

    def body(*parts: tuple[bytes, bytes]) -> bytes:
        return b"".join(
            f"--{boundary}\r\n".encode() + headers + b"\r\n" + data + b"\r\n" for headers, data in parts
        ) + (f"--{boundary}--\r\n".encode())

    bodies = {
        "image, then priority": body((image + priority, b"urgent"), (image, jpeg_bytes)),
        "priority, then image": body((priority + image, jpeg_bytes)),
        "image/jpeg, then text/html": body(
            (image + b"Content-Type: image/jpeg\r\nContent-Type: text/html\r\n", jpeg_bytes)
        ),
        "text/html, then image/jpeg": body(
            (image + b"Content-Type: text/html\r\ncontent-type: image/jpeg\r\n", jpeg_bytes)
        ),
    }
    for name, sent in bodies.items():
        response = _post(client, tenant, sent, f"multipart/form-data; boundary={boundary}")
        assert (response.status_code, response.json().get("code")) == (400, "invalid_multipart"), (name, response.text)
    assert rows_for(settings, tenant.clinic_id) == {"cases": 0, "blobs": 0, "case_events": 0}


def test_odd_but_valid_images_never_crash_the_worker(client, worker, tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    rgb = Image.open(io.BytesIO(jpeg_bytes))
    exif = Image.Exif()
    exif[0x0112] = 8
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    odd = {
        "cmyk jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "16-bit png": encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), "PNG"),
        "palette png with transparency": encode(palette, "PNG", transparency=0),
        "rgba webp": encode(rgba, "WEBP"),
        "exif-rotated jpeg": encode(rgb, "JPEG", exif=exif),
        "grayscale tiff": encode(rgb.convert("L"), "TIFF"),
        "bmp": encode(rgb, "BMP"),
        "long thin 4000x40": encode(rgb.resize((4000, 40)), "JPEG"),
        "large 3000x2250": encode(rgb.resize((3000, 2250)), "JPEG", quality=85),
        "progressive jpeg": encode(rgb, "JPEG", progressive=True),
    }
    ids = {}
    for name, data in odd.items():
        response = client.post(
            "/v1/cases", headers=tenant.headers, files={"image": ("x", data, "application/octet-stream")}
        )
        assert response.status_code == 202, (name, response.text)
        ids[name] = response.json()["id"]
    for name, case_id in ids.items():
        body = wait_done(client, tenant, case_id, timeout=180)
        assert body["status"] == "succeeded", (name, body)
        assert abs(sum(body["result"]["probabilities"].values()) - 1) < 1e-6
    assert worker.alive()
