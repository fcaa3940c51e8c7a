"""Safe decoding of untrusted image bytes into an RGB ``PIL.Image``.

Used by the API intake (every upload), the worker (the decrypted upload) and training. It needs only
Pillow and the standard library, so the API process stays free of torch and numpy.

Defences, in order: a byte cap; magic-byte sniffing against an allow-list, with Pillow restricted to
the sniffed format (a polyglot cannot be reinterpreted as something else); the declared dimensions
checked against explicit side and pixel caps *before* any pixel is decoded (decompression bombs);
a full decode, so a truncated file fails here rather than in the worker; EXIF orientation applied;
every pixel mode converted to 8-bit sRGB (:mod:`ml.srgb`, which applies an embedded ICC profile).
Anything else raises :class:`InvalidImage` with a stable ``code`` and a message that says what was
wrong and what to do. The returned image carries no ``icc_profile`` (untagged = sRGB).

A caller may be told what the header declares before the pixels decode (``on_header``): the intake
stores a camera image's case meanwhile, on another core (``api.intake_limits``).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from PIL import Image, ImageFile

from ml import orientation, structure
from ml.decode_budget import DecodeBudget, DecodeBusy, TooLargeToDecode, estimate_for, jpeg_coefficient_bytes
from ml.srgb import UnsupportedMode, to_rgb

#: Pillow formats dermq accepts, by the name Pillow gives them.
ACCEPTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "TIFF", "WEBP", "BMP"})

#: The media type of each accepted format, for callers that echo it back.
MEDIA_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}


class InvalidImage(ValueError):
    """The bytes are not an image dermq will process.

    ``code`` is stable and machine-readable (``empty``, ``file_too_large``, ``unsupported_format``,
    ``corrupt``, ``truncated``, ``too_small``, ``too_large``, ``decompression_bomb``,
    ``unsupported_mode``); ``message`` is for humans and never contains image data.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"InvalidImage(code={self.code!r}, message={self.message!r})"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Bounds on an acceptable image. The defaults suit clinic uploads (up to about 40 megapixels)."""

    max_bytes: int = 25 * 1024 * 1024
    max_side: int = 12_000
    max_pixels: int = 50_000_000
    #: The cap for formats whose compression has no practical bound (everything but JPEG): a few
    #: hundred kilobytes of PNG can declare a canvas of gigabytes.
    max_lossless_pixels: int = 25_000_000
    min_side: int = 32
    formats: frozenset[str] = field(default=ACCEPTED_FORMATS)

    @classmethod
    def from_settings(cls, settings: UploadBounds) -> ImageLimits:
        """The limits a service's settings configure."""
        return cls(
            max_bytes=settings.max_upload_bytes,
            max_side=settings.max_image_side,
            max_pixels=settings.max_image_pixels,
            max_lossless_pixels=min(settings.max_lossless_pixels, settings.max_image_pixels),
            min_side=settings.min_image_side,
        )


class UploadBounds(Protocol):
    """The settings :meth:`ImageLimits.from_settings` reads (``core.config.Settings`` has them)."""

    @property
    def max_upload_bytes(self) -> int: ...
    @property
    def max_image_side(self) -> int: ...
    @property
    def max_image_pixels(self) -> int: ...
    @property
    def max_lossless_pixels(self) -> int: ...
    @property
    def min_image_side(self) -> int: ...


DEFAULT_LIMITS = ImageLimits()

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format that ``data``'s leading magic bytes announce, or ``None``.

    Knows more formats than dermq accepts (GIF), so that a refusal can name what was sent.
    """
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


#: An upload is worked on at a reduced size only when its longer side is more than this many times it.
FIT_FACTOR = 2
#: ... and when the reduced image's shorter side keeps at least this many pixels: the models' inputs
#: are at most 224 a side, so they never enlarge it (a 4000x40 strip keeps its decode).
MIN_FIT_SHORT_SIDE = 224


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` reduced to at most ``max_side`` on its longer side, the
    aspect kept (unchanged when it already fits)."""
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return (width, height)
    scale = max_side / longer
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _human_size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n} bytes"


def check_declared_size(width: int, height: int, limits: ImageLimits, fmt: str = "JPEG") -> None:
    """Refuse dimensions outside ``limits`` (for a file of format ``fmt``) before any pixel is decoded."""
    cap = limits.max_pixels if fmt == "JPEG" else min(limits.max_pixels, limits.max_lossless_pixels)
    if width * height > cap:
        kind = "" if fmt == "JPEG" else f" for {fmt} (JPEG may have up to {limits.max_pixels / 1e6:.0f})"
        raise InvalidImage(
            "decompression_bomb",
            f"image declares {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {cap / 1e6:.0f} megapixels{kind}",
        )
    if max(width, height) > limits.max_side:
        raise InvalidImage(
            "too_large",
            f"image is {width}x{height} pixels; the limit is {limits.max_side} on each side",
        )
    if min(width, height) < limits.min_side:
        raise InvalidImage(
            "too_small",
            f"image is {width}x{height} pixels; dermq needs at least {limits.min_side} on each side",
        )


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an upload's header declares (:func:`decode`'s ``on_header``)."""

    format: str
    width: int  # as stored in the file, before EXIF rotation
    height: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded upload: the RGB pixels plus what the file declared."""

    image: Image.Image
    format: str  # Pillow's name: JPEG, PNG, TIFF, WEBP, BMP
    width: int  # as stored in the file, before draft scaling and EXIF rotation
    height: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def header(self) -> ImageHeader:
        return ImageHeader(self.format, self.width, self.height)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, reduce_to: int | None = None) -> Image.Image:
    """Decode untrusted bytes into a fully loaded 8-bit RGB image (see :func:`decode`)."""
    return decode(data, limits, reduce_to=reduce_to).image


def decode(
    data: bytes,
    limits: ImageLimits = DEFAULT_LIMITS,
    *,
    reduce_to: int | None = None,
    fit: int | None = None,
    budget: DecodeBudget | None = None,
    on_header: Callable[[ImageHeader], None] | None = None,
    passthrough: tuple[type[BaseException], ...] = (),
) -> DecodedImage:
    """Decode untrusted bytes into a fully loaded 8-bit RGB image.

    ``reduce_to`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, several times
    faster for camera-sized files) as long as its longer side stays at least ``reduce_to`` pixels.
    With ``fit``, an upload large enough for a working size (:func:`working_size`) whose decode is
    larger than that is returned reduced to it, Pillow's bicubic (a working copy's own resampling), before the
    decode's memory is released.
    The whole entropy-coded stream is still read, so a truncated file is still refused. Other
    formats decode at full size.

    With a ``budget``, the decode's estimated peak memory is reserved in it from just before the
    pixels are decoded until the RGB image is returned; :class:`~ml.decode_budget.DecodeBusy` or
    :class:`~ml.decode_budget.TooLargeToDecode` propagate to the caller.

    ``on_header`` is called (on the calling thread) with what the header declares once every check
    made before the pixels has passed and the budget's reservation is held, just before the pixels
    decode: the intake stores the case meanwhile (``api.intake_limits``). It must not raise.

    Raises :class:`InvalidImage` for what the file is, ``MemoryError`` when this process cannot
    allocate, and the errors of ``passthrough`` as they come (a worker's soft time limit: anything
    else raised while decoding is taken for a malformed file); never returns a partially decoded image.
    """
    fmt, scans = _accepted_format(data, limits)
    with _Refusals(fmt, passthrough):
        image = _opened(data, fmt, limits)
        declared = (image.width, image.height)
        # a progressive or multi-scan JPEG holds every coefficient of the declared size, drafted or not
        whole = fmt == "JPEG" and (scans > 1 or bool(image.info.get("progressive")))
        held = jpeg_coefficient_bytes(image, *declared) if whole else 0
        if reduce_to is not None and fmt == "JPEG" and image.mode in ("RGB", "L"):
            image.draft(image.mode, _draft_request(image.width, image.height, reduce_to))
        with budget.reserve(estimate_for(image, fmt) + held) if budget is not None else nullcontext():
            if on_header is not None:
                on_header(ImageHeader(fmt, *declared))
            return _fitted(_load_rgb(image, fmt, declared, (MemoryError, *passthrough)), fit)


def _accepted_format(data: bytes, limits: ImageLimits) -> tuple[str, int]:
    """The sniffed format of an upload within the byte cap and of an accepted format, and its scans (a
    JPEG's; 1 for the others: :func:`ml.structure.examined`); else InvalidImage."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch some libraries flip; we refuse to run with it
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated uploads would pass")
    if not data:
        raise InvalidImage("empty", "the upload is empty (0 bytes); attach the image file")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            "file_too_large",
            f"the image is {_human_size(len(data))}; the limit is {_human_size(limits.max_bytes)}",
        )
    fmt = sniff_format(data)
    if fmt is None or fmt not in limits.formats:
        accepted = ", ".join(sorted(limits.formats))
        what = f"a {fmt} file" if fmt else "not a recognised image format"
        raise InvalidImage("unsupported_format", f"the upload is {what}; send one of: {accepted}")
    # structures that cost far more to open or decode than their pixels: see ml.structure
    if fmt == "TIFF" and (size := structure.tiff_size(data)) is not None:
        check_declared_size(*size, limits, fmt)
    refused, scans = structure.examined(data, fmt)
    if refused is not None:
        raise InvalidImage(*refused)
    return fmt, scans


def _opened(data: bytes, fmt: str, limits: ImageLimits) -> Image.Image:
    """The upload opened as ``fmt`` (its header read, no pixel decoded), its declared size checked."""
    image = Image.open(io.BytesIO(data), formats=[fmt])
    # Pillow opens a JPEG with a multi-picture section (phone cameras' depth maps and Ultra HDR
    # gain maps) as MPO: its first frame is the photograph, a baseline JPEG, and is what dermq reads.
    if image.format != fmt and not (fmt == "JPEG" and image.format == "MPO"):
        raise InvalidImage("corrupt", f"the file claims to be {fmt} but does not decode as one")
    check_declared_size(image.width, image.height, limits, fmt)
    return image


class _Refusals:
    """Whatever Pillow raises for a bad ``fmt`` file, as :class:`InvalidImage`; the decode budget's
    refusals, ``MemoryError`` (this process could not allocate: not the file's fault, and worth
    another try) and the caller's ``passthrough`` errors (a worker's soft time limit, which may land
    anywhere) as they are. Pillow's bomb warning is silenced inside: our own caps run first, and it
    must never be printed with request data."""

    def __init__(self, fmt: str, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.fmt = fmt
        self.passthrough = (InvalidImage, DecodeBusy, TooLargeToDecode, MemoryError, *passthrough)
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._warnings.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._warnings.__exit__(kind, exc, tb)
        if exc is None or isinstance(exc, self.passthrough) or not isinstance(exc, Exception):
            return  # nothing raised, or raised as it is
        fmt = self.fmt
        if isinstance(exc, UnsupportedMode):
            raise InvalidImage("unsupported_mode", str(exc)) from None
        if isinstance(exc, Image.DecompressionBombError):
            raise InvalidImage("decompression_bomb", "image declares more pixels than dermq decodes") from None
        if isinstance(exc, EOFError) or (isinstance(exc, OSError) and "truncat" in str(exc).lower()):
            raise InvalidImage(
                "truncated", f"the {fmt} file ends before its image data does; upload the complete file"
            ) from None
        # Malformed files raise all sorts (OSError, struct.error, IndexError, ValueError, SyntaxError...).
        raise InvalidImage("corrupt", f"the {fmt} file is damaged and cannot be decoded") from None


def _load_rgb(
    image: Image.Image, fmt: str, declared: tuple[int, int], raised: tuple[type[BaseException], ...] = (MemoryError,)
) -> DecodedImage:
    """Decode the pixels of an opened, size-checked ``image`` and convert them to 8-bit sRGB. What is
    tolerated in a file (a malformed EXIF block or colour profile) is tolerated whatever it raises,
    except ``raised``: no fault of the file's (a worker's soft time limit, memory), never swallowed."""
    image.load()
    rgb = to_rgb(orientation.upright(image, raised), fmt, image.info.get("icc_profile"), raised)
    rgb.info.pop("icc_profile", None)  # the pixels are sRGB now, whatever the file said
    return DecodedImage(rgb, fmt, declared[0], declared[1])


def working_size(decoded: DecodedImage, fit: int) -> tuple[int, int] | None:
    """The size a large upload is worked on at: its decode's own size when that is at most ``fit``
    pixels on the longer side (the heat map's overlay size, at least twice the models' inputs), else
    reduced to ``fit``. None for an upload that keeps its decode: one at most :data:`FIT_FACTOR` times
    ``fit`` on its longer side (decoding it is as cheap as reading a reduced copy), or one so long and
    thin that the shorter side would fall below :data:`MIN_FIT_SHORT_SIDE` (the model would have to
    enlarge it again)."""
    if max(decoded.width, decoded.height) <= FIT_FACTOR * fit:
        return None
    size = fit_within(decoded.image.size, fit)
    return size if min(size) >= MIN_FIT_SHORT_SIDE else None


def _fitted(decoded: DecodedImage, fit: int | None) -> DecodedImage:
    size = working_size(decoded, fit) if fit is not None else None
    if size is None or size == decoded.image.size:
        return decoded
    reduced = decoded.image.resize(size, Image.Resampling.BICUBIC)
    return DecodedImage(reduced, decoded.format, decoded.width, decoded.height)


def _draft_request(width: int, height: int, reduce_to: int) -> tuple[int, int]:
    """The (width, height) to ask draft mode for so the longer side stays >= ``reduce_to``."""
    longer = max(width, height)
    if longer <= reduce_to:
        return (width, height)
    factor = reduce_to / longer
    return (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor)))
