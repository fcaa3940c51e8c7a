"""ml.images: embedded ICC profiles are applied at decode, and a bad profile never refuses an image.

The profiles are written by hand (ICC v2) so that the expected conversion is easy to state: an RGB
"display" whose red and green primaries are sRGB's green and red, with a linear (gamma 1.0) tone
curve; a linear grayscale one; and a CMYK printer whose cyan and magenta inks are swapped.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from ml import srgb
from ml.images import decode, decode_image

D50 = (0.9642, 1.0, 0.8249)
_SRGB = ImageCms.createProfile("sRGB")


def colorant(name: str) -> tuple[float, float, float]:
    """sRGB's ``red``, ``green`` or ``blue`` primary as D50-adapted XYZ."""
    value = getattr(_SRGB, f"{name}_colorant")
    assert value is not None
    return value[0]


def s15f16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(s15f16(v) for v in xyz)


def gamma_tag(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def desc_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    # ASCII description, then empty Unicode and ScriptCode descriptions (ICC v2 textDescriptionType).
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def icc_profile(device_class: bytes, colour_space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    """A complete ICC v2.1 profile with ``tags`` (signature -> tag data)."""
    table_end = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags.items():
        table += struct.pack(">4sII", signature, table_end + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    size = table_end + len(body)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0" * 4, 0x02100000, device_class, colour_space, pcs)
        + b"\0" * 12  # creation date
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + b"".join(s15f16(v) for v in D50)
        + b"\0" * 48  # creator, profile id, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def swapped_rgb_profile() -> bytes:
    """Linear RGB whose red primary is sRGB's green and whose green primary is sRGB's red."""
    return icc_profile(
        b"mntr",
        b"RGB ",
        b"XYZ ",
        {
            b"desc": desc_tag("swapped linear RGB"),
            b"wtpt": xyz_tag(D50),
            b"rXYZ": xyz_tag(colorant("green")),
            b"gXYZ": xyz_tag(colorant("red")),
            b"bXYZ": xyz_tag(colorant("blue")),
            b"rTRC": gamma_tag(1.0),
            b"gTRC": gamma_tag(1.0),
            b"bTRC": gamma_tag(1.0),
        },
    )


def linear_gray_profile() -> bytes:
    return icc_profile(
        b"mntr", b"GRAY", b"XYZ ", {b"desc": desc_tag("linear gray"), b"wtpt": xyz_tag(D50), b"kTRC": gamma_tag(1.0)}
    )


def lab8(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB in [0, 1] -> (N, 3) CIELAB (D50) in the 8-bit ICC encoding, by LittleCMS."""
    pixels = Image.fromarray(np.round(rgb * 255).astype(np.uint8)[None])
    lab = ImageCms.profileToProfile(pixels, _SRGB, ImageCms.createProfile("LAB"), outputMode="LAB")
    assert lab is not None
    encoded = np.asarray(lab)[0].copy()
    encoded[:, 1:] ^= 0x80  # Pillow stores a* and b* as signed bytes; ICC offsets them by 128
    return encoded


def swapped_cmyk_profile() -> bytes:
    """A CMYK printer (A2B0 lut8, Lab PCS, 2-point grid) whose cyan ink is magenta and magenta ink cyan."""
    corners = np.array([[c, m, y, k] for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)], float)
    c, m, y, k = corners.T
    rgb = np.stack([(1 - m) * (1 - k), (1 - c) * (1 - k), (1 - y) * (1 - k)], axis=1)  # naive, C and M swapped
    identity_matrix = b"".join(s15f16(1.0 if i % 4 == 0 else 0.0) for i in range(9))
    ramp = bytes(range(256))
    lut = b"mft1\0\0\0\0" + bytes([4, 3, 2, 0]) + identity_matrix + ramp * 4 + lab8(rgb).tobytes() + ramp * 3
    return icc_profile(
        b"prtr", b"CMYK", b"Lab ", {b"desc": desc_tag("swapped inks"), b"wtpt": xyz_tag(D50), b"A2B0": lut}
    )


def srgb_encode(linear: float) -> float:
    """The sRGB transfer function, [0, 1] -> 8-bit level."""
    encoded = 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055
    return 255 * encoded


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def two_colours(
    mode: str = "RGB", left: tuple[int, ...] = (200, 0, 0), right: tuple[int, ...] = (64, 64, 64)
) -> Image.Image:
    image = Image.new(mode, (64, 64), left)
    image.paste(Image.new(mode, (32, 64), right), (32, 0))
    return image


def pixel(image: Image.Image, where: str) -> np.ndarray:
    """The pixel in the middle of the ``left`` or ``right`` half, at any decoded size."""
    x = image.width // 4 if where == "left" else image.width * 3 // 4
    return np.asarray(image, dtype=int)[image.height // 2, x]


SAVE: dict[str, dict[str, object]] = {
    "PNG": {},
    "TIFF": {},
    "WEBP": {"lossless": True},
    "JPEG": {"quality": 95, "subsampling": 0},
}


@pytest.mark.parametrize("fmt", sorted(SAVE))
def test_a_non_srgb_profile_is_converted_to_srgb(fmt: str) -> None:
    data = encode(two_colours(), fmt, icc_profile=swapped_rgb_profile(), **SAVE[fmt])
    decoded = decode(data, reduce_to=32)  # draft mode for the JPEG: conversion comes after it
    assert decoded.image.mode == "RGB" and decoded.image.size == ((32, 32) if fmt == "JPEG" else (64, 64))
    # The file's red 200 is its linear "red" primary, which is sRGB's green: green in sRGB, brighter.
    np.testing.assert_allclose(pixel(decoded.image, "left"), [0, srgb_encode(200 / 255), 0], atol=3)
    # Linear gray 64 is lighter once sRGB-encoded (about 137).
    np.testing.assert_allclose(pixel(decoded.image, "right"), [srgb_encode(64 / 255)] * 3, atol=3)
    assert "icc_profile" not in decoded.image.info  # untagged: the pixels are sRGB


def test_an_srgb_profile_leaves_the_pixels_alone() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    srgb_bytes = ImageCms.ImageCmsProfile(_SRGB).tobytes()
    decoded = decode_image(encode(Image.fromarray(raw), "PNG", icc_profile=srgb_bytes))
    assert np.abs(np.asarray(decoded, dtype=int) - raw).max() <= 2


def test_grayscale_profile_is_applied() -> None:
    data = encode(Image.new("L", (40, 40), 64), "PNG", icc_profile=linear_gray_profile())
    np.testing.assert_allclose(pixel(decode_image(data), "left"), [srgb_encode(64 / 255)] * 3, atol=2)


def test_profile_is_applied_before_alpha_is_flattened() -> None:
    image = two_colours("RGBA", (200, 0, 0, 255), (200, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG", icc_profile=swapped_rgb_profile()))
    np.testing.assert_allclose(pixel(decoded, "left"), [0, srgb_encode(200 / 255), 0], atol=2)
    assert pixel(decoded, "right").tolist() == [0, 0, 0]  # transparent: the black background


def test_cmyk_jpeg_follows_its_profile() -> None:
    inks = two_colours("CMYK", (255, 0, 0, 0), (0, 0, 0, 0))  # cyan ink | bare paper
    plain = decode_image(encode(inks, "JPEG", quality=95))
    profiled = decode_image(encode(inks, "JPEG", quality=95, icc_profile=swapped_cmyk_profile()))
    r, g, b = pixel(plain, "left")
    assert r < 60 and g > 200 and b > 200  # no profile: naive cyan
    r, g, b = pixel(profiled, "left")
    assert r > 200 and g < 60 and b > 200  # this printer's "cyan" ink is magenta
    assert pixel(profiled, "right").min() > 245  # paper is white


GARBAGE = {
    "text": b"not an ICC profile at all",
    "truncated": swapped_rgb_profile()[:150],
    "huge tag count": swapped_rgb_profile()[:128] + struct.pack(">I", 0xFFFFFFFF) + b"\0" * 64,
    "tag beyond the end": swapped_rgb_profile()[:132] + struct.pack(">4sII", b"rXYZ", 10_000_000, 20) + b"\0" * 64,
    "gray profile on RGB": linear_gray_profile(),
    "device link": icc_profile(b"link", b"RGB ", b"RGB ", {b"desc": desc_tag("link")}),
}


@pytest.mark.parametrize("profile", list(GARBAGE.values()), ids=list(GARBAGE))
def test_an_unusable_profile_is_ignored_not_refused(profile: bytes) -> None:
    raw = two_colours()
    decoded = decode_image(encode(raw, "PNG", icc_profile=profile))
    assert np.array_equal(np.asarray(decoded), np.asarray(raw))  # taken as sRGB
    assert "icc_profile" not in decoded.info


def test_a_profile_over_the_size_cap_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    profile = swapped_rgb_profile()
    monkeypatch.setattr(srgb, "MAX_ICC_PROFILE_BYTES", len(profile) - 1)
    parsed: list[object] = []
    monkeypatch.setattr(ImageCms, "ImageCmsProfile", lambda *args: parsed.append(args))
    raw = two_colours()
    decoded = decode_image(encode(raw, "TIFF", icc_profile=profile))
    assert np.array_equal(np.asarray(decoded), np.asarray(raw))  # taken as sRGB
    assert parsed == []  # never handed to LittleCMS


@pytest.mark.parametrize("where", ["profile", "conversion", "orientation"])
def test_a_callers_own_error_inside_what_a_file_may_get_wrong_is_not_swallowed(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed profile or EXIF block is tolerated whatever it raises; a worker's soft time limit
    that lands there is not the file's: it once fell back to the naive conversion and decoded on, so
    the case ran past its soft limit until the hard one killed the worker's child."""

    class Stopped(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stopped

    target = {
        "profile": (ImageCms, "ImageCmsProfile"),
        "conversion": (ImageCms, "profileToProfile"),
        "orientation": (Image.Exif, "get"),
    }[where]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: its EXIF is read
    data = encode(two_colours(), "JPEG", icc_profile=swapped_rgb_profile(), exif=exif.tobytes(), **SAVE["JPEG"])
    monkeypatch.setattr(*target, stop)
    with pytest.raises(Stopped):
        decode(data, passthrough=(Stopped,))
    with pytest.raises(MemoryError):  # nor is memory this process could not allocate
        monkeypatch.setattr(*target, lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
        decode(data)
    monkeypatch.setattr(*target, stop)
    assert decode(data).image.mode == "RGB"  # raised by the file's own data: tolerated, as before
