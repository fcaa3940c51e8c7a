"""Every pixel mode an accepted upload can decode to, as 8-bit sRGB (what :func:`ml.images.decode` returns).

An embedded ICC profile (RGB, grayscale or CMYK, matching the pixel mode) is applied with LittleCMS,
perceptual intent, before alpha is composited; the model was trained on untagged (sRGB) HAM10000
images, so an Adobe RGB or Display P3 upload would otherwise be read with shifted colours. A profile
that is malformed, larger than :data:`MAX_ICC_PROFILE_BYTES`, or made for another colour space is
ignored and the pixels are taken as sRGB: a profile is never a reason to refuse a clinical image.
16-bit samples are scaled into 8 bits; alpha is composited onto black.

Pillow only.
"""

from __future__ import annotations

import io

from PIL import Image, ImageCms

#: The largest embedded ICC profile dermq parses; larger ones are ignored unread. Matrix/TRC RGB
#: profiles are 0.5-4 KiB; LUT-based CMYK ones reach about 600 KiB (U.S. Web Coated SWOP v2: 544 KiB).
MAX_ICC_PROFILE_BYTES = 1024 * 1024

#: Pixel mode -> the ICC colour space a profile must describe to be applied to it.
_PROFILE_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}
#: Profile classes that describe a device's or a space's colours (not device links or abstract ones).
_PROFILE_CLASSES = frozenset({"mntr", "scnr", "prtr", "spac"})


class UnsupportedMode(ValueError):
    """A pixel mode with no 8-bit sRGB conversion here; the message says which and what to send."""

    def __init__(self, fmt: str, mode: str) -> None:
        super().__init__(f"the {fmt} file uses pixel mode {mode}; send 8- or 16-bit RGB or grayscale")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite onto black, the colour of a dermatoscope's vignette."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, fmt: str, icc: object, raised: tuple[type[BaseException], ...] = ()) -> Image.Image:
    """8-bit sRGB: the embedded profile ``icc`` applied where usable, then any alpha composited on black.
    A profile that does not parse or convert is ignored, whatever it raises, except ``raised``."""
    if image.mode in ("LAB", "HSV"):
        icc = None  # a profile for these would describe another space than the RGB we convert them to
    base = _to_base_mode(image, fmt)
    if base.mode not in ("RGBA", "LA"):
        return _to_srgb(base, icc, raised)
    rgb = _to_srgb(base.convert(base.mode[:-1]), icc, raised)  # the colour without its alpha: RGB or L
    rgb.putalpha(base.getchannel("A"))
    return _flatten_alpha(rgb)


def _to_base_mode(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in one of the 8-bit modes a profile can apply to: RGB, RGBA, L, LA or CMYK."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return image
    if mode in ("PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    if mode in ("P", "RGBX", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode == "1":
        return image.convert("L")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Scale 16-bit samples into 8 bits; Pillow's convert("L") would clip everything above 255.
        wide = image.convert("I")
        scale = 1 / 256 if mode != "I" or _max_sample(wide) > 255 else 1.0
        return wide.point(lambda v: v * scale).convert("L")
    raise UnsupportedMode(fmt, mode)


def _max_sample(image: Image.Image) -> int:
    extrema = image.getextrema()
    return int(extrema[1]) if isinstance(extrema, tuple) and not isinstance(extrema[0], tuple) else 65535


def _to_srgb(image: Image.Image, icc: object, raised: tuple[type[BaseException], ...]) -> Image.Image:
    """``image`` (RGB, L or CMYK) as sRGB RGB: through its embedded profile where usable, else as if already sRGB."""
    profile = _embedded_profile(icc, image.mode, raised)
    if profile is not None:
        try:
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(
                image, profile, srgb, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
            )
        except raised:
            raise
        except Exception:
            converted = None  # LittleCMS refused the pair: fall back to the naive conversion below
        if converted is not None and converted.mode == "RGB":
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")


def _embedded_profile(
    icc: object, mode: str, raised: tuple[type[BaseException], ...]
) -> ImageCms.ImageCmsProfile | None:
    """The parsed profile ``icc`` when it is small enough, parses, and describes ``mode``'s colour space."""
    if not isinstance(icc, bytes) or not icc or len(icc) > MAX_ICC_PROFILE_BYTES or _slow_to_apply(icc):
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space, device_class = profile.profile.xcolor_space, profile.profile.device_class
    except raised:
        raise
    except Exception:
        # Malformed profiles raise PyCMSError, OSError, ValueError, TypeError...; none is worth a refusal.
        return None
    return profile if space == _PROFILE_SPACES.get(mode) and device_class in _PROFILE_CLASSES else None


#: tags LittleCMS prefers and evaluates in floating point, curve segment by segment (ICC v4's
#: DToB/BToD, multi-process elements): a 1 KB PNG carrying a profile with one 20,000-segment curve
#: took 6.9 s to convert, about 40 s near the size cap (a review). Camera and display profiles use
#: the AToB/BToA tables or matrices and curves instead.
_SLOW_TAGS = (b"D2B0", b"D2B1", b"D2B2", b"D2B3", b"B2D0", b"B2D1", b"B2D2", b"B2D3")


def _slow_to_apply(icc: bytes) -> bool:
    """Whether the profile has a tag :data:`_SLOW_TAGS` names, or a multi-process element (``mpet``)
    anywhere: such a profile is ignored, and the pixels taken as sRGB."""
    if len(icc) < 132:
        return False
    count = int.from_bytes(icc[128:132], "big")
    for i in range(min(count, (len(icc) - 132) // 12)):
        entry = 132 + 12 * i
        offset = int.from_bytes(icc[entry + 4 : entry + 8], "big")
        if icc[entry : entry + 4] in _SLOW_TAGS or icc[offset : offset + 4] == b"mpet":
            return True
    return False
