"""The working copy of a large upload: its pixels at the size the worker needs, decoded once.

A 12-megapixel camera JPEG costs the intake a draft-mode decode to validate it and, before this
module, cost the worker a second one (about 35 ms of a 215 ms case at idle). The intake now keeps what
its decode produced (``ml.images.decode`` with ``fit``): the upright sRGB pixels at their working
size, at most ``fit`` (the overlay's ``DERMQ_OVERLAY_MAX_SIDE``, 512 by default) on the longer side:
a JPEG's draft decode as it is when it lands there (a 4000x3000 photo at 1/8: 500x375, no resampling
at all), anything larger reduced to ``fit``, bicubic. It is stored encrypted next to the original
(which is kept as sent). The worker reads the working copy instead of the original and never decodes
12 megapixels again. Small uploads (HAM10000's 600x450) and long thin strips get none
(``ml.images.working_size``): their own decode is as cheap, or the copy would lose what the model needs.

Format: binary PPM (netpbm P6: a text header, then the RGB bytes row by row) with one comment line
that records what the original file declared (its format and stored size), so the worker's result
still reports the upload's own dimensions. PPM because the pixels are already decoded: reading it is a
copy, not a decode (0.3 ms for 512x384 against 35 ms for the 4000x3000 JPEG), and any image tool opens
it. The copy is sealed (AES-GCM, bound to its case and kind) like every blob, so the worker reads
only what an intake wrote; the parser is strict all the same.

Answers: the model sees the working copy reduced to its input size instead of the 1/4-scale draft
decode the worker used to make. On the benchmark's three 12-megapixel JPEGs the calibrated
probabilities from the 1/8-scale copy differ from a full decode's by at most 0.023 (the worker's old
1/4-scale decode: 0.028; a 512-pixel bicubic copy of it: 0.006, but resampling it costs the intake
about 15 ms more), and the labels are the same; tests/ml/test_working_copy.py holds them within
0.03, as tests/ml/test_draft_decode.py does draft decoding. The heat map is drawn on the copy as it is.

Pillow and the standard library only (the API process imports this).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from PIL import Image

from ml.decode_budget import DecodeBudget
from ml.images import FIT_FACTOR, MEDIA_TYPES, DecodedImage, ImageHeader, ImageLimits, decode, working_size

MEDIA_TYPE = "image/x-portable-pixmap"

_HEADER = re.compile(
    rb"P6\n# dermq-working-copy (?P<fmt>[A-Z]{3,4}) (?P<w>[0-9]{1,6})x(?P<h>[0-9]{1,6})\n"
    rb"(?P<width>[0-9]{1,5}) (?P<height>[0-9]{1,5})\n255\n"
)


class InvalidWorkingCopy(ValueError):
    """The bytes are not a working copy this module wrote."""


def decode_upload(
    data: bytes,
    limits: ImageLimits,
    *,
    fit: int,
    budget: DecodeBudget | None = None,
    on_header: Callable[[ImageHeader], None] | None = None,
) -> tuple[DecodedImage, bytes | None]:
    """An upload decoded once (:func:`ml.images.decode`, which validates it and calls ``on_header``)
    at the size the worker needs, and its working copy when it is large enough to want one: a JPEG
    in draft mode to between half and all of ``fit`` on the longer side (a 12-megapixel photo at 1/8,
    used as it is), anything larger than ``fit`` reduced to it."""
    decoded = decode(data, limits, reduce_to=fit // 2, fit=fit, budget=budget, on_header=on_header)
    return decoded, make(decoded, fit)


def drafted(header: ImageHeader, fit: int) -> bool:
    """Whether an upload with this header gets a working copy straight from a draft-mode decode: a JPEG
    more than :data:`ml.images.FIT_FACTOR` times ``fit`` on its longer side, a camera photo."""
    return header.format == "JPEG" and max(header.width, header.height) > FIT_FACTOR * fit


def make(decoded: DecodedImage, fit: int) -> bytes | None:
    """The working copy of ``decoded``, an upload decoded with ``fit`` (:func:`ml.images.decode`): its
    pixels when they came back reduced to their working size; None for an upload that keeps its decode
    (:func:`ml.images.working_size`), for which no copy is worth storing."""
    image = decoded.image
    if working_size(decoded, fit) != image.size:
        return None
    declared = f"{decoded.format} {decoded.width}x{decoded.height}"
    header = f"P6\n# dermq-working-copy {declared}\n{image.width} {image.height}\n255\n"
    return header.encode("ascii") + image.tobytes()


def read(data: bytes) -> DecodedImage:
    """The image of a working copy, as a :class:`DecodedImage` of the original upload (its format and
    declared size); raises :class:`InvalidWorkingCopy` for anything :func:`make` did not write."""
    match = _HEADER.match(data)
    if match is None or match["fmt"].decode() not in MEDIA_TYPES:
        raise InvalidWorkingCopy("not a dermq working copy")
    width, height = int(match["width"]), int(match["height"])
    pixels = memoryview(data)[match.end() :]
    if width < 1 or height < 1 or len(pixels) != width * height * 3:
        raise InvalidWorkingCopy(f"a {width}x{height} working copy must hold {width * height * 3} bytes of pixels")
    image = Image.frombytes("RGB", (width, height), pixels)
    return DecodedImage(image, match["fmt"].decode(), int(match["w"]), int(match["h"]))
