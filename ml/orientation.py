"""Turning a decoded image upright by its EXIF orientation (Pillow only: the API process imports it)."""

from __future__ import annotations

from PIL import Image

#: The EXIF tag that says how the stored pixels are turned.
ORIENTATION = 0x0112

#: EXIF orientation -> the turn that makes the image upright (as ``ImageOps.exif_transpose`` turns it)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(image: Image.Image, raised: tuple[type[BaseException], ...]) -> Image.Image:
    """``image`` turned upright by its EXIF orientation; the image itself (not a copy) when upright.

    The turn alone, not ``ImageOps.exif_transpose``: that also rewrites the whole EXIF block without
    its orientation, every value of every tag made a Python object and packed again, and a PNG's or
    WebP's EXIF has no size limit (a 4.8 MB PNG of 600,000 values in one private tag took 4.7 s and
    186 MiB the decode budget never counted). Nothing reads the EXIF after this (the pixels are
    upright, the stored original keeps its own), so the result carries none."""
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
        turn = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    except raised:
        raise
    except Exception:
        # A malformed EXIF block is not worth refusing a clinical image for; keep the stored pixels.
        return image
    if turn is None:
        return image
    upright = image.transpose(turn)
    upright.info.pop("exif", None)
    return upright
