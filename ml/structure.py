"""What an upload's own structure would cost to open and decode, checked before Pillow opens it.

Pillow parses a file's headers in Python, and some structures that fit the byte and pixel caps cost
far more than their pixels (measured by a review with Pillow 13 on this project's 2-core VM):

- **JPEG**: scans repeated, fill bytes, arithmetic coding, floods of frame headers, quantization
  tables, Photoshop resources or EXIF segments, which Pillow parses in Python (:mod:`ml.jpeg_scans`).
- **TIFF**: one tile per entry of StripOffsets or TileOffsets, whatever the image's size: a 32x32
  image with a million offsets (a 1 MB file) took 4.5 s and 237 MiB inside ``Image.open``, before any
  decode budget was reserved; a numeric tag of 500,000 rationals, 0.8 s. The first directory's entries
  are read here, and one that names a tag twice or runs past the file's end is refused (Pillow skips
  a copy it cannot use and keeps the entries it could read: a StripOffsets of no values before one
  of 400,000, or a directory cut short, took 2-5 s and 100 MiB past these checks): no more offsets
  than the image's strips or tiles (Pillow makes a tile of each), at most :data:`MAX_TIFF_PARTS`, and
  no numeric tag of more than :data:`MAX_TIFF_VALUES` values. ``ml.images`` checks the declared size
  (:func:`tiff_size`) before, so that a forged height does not allow millions of strips. The EXIF, GPS
  and interoperability directories it points to are read whole at the end of every decode
  (``TiffImageFile.load_end``), every value of every tag made a Python object: 3,000,000 rationals in
  one (a 24 MB file of 64x64 pixels) took 9.8 s and 850 MiB that no decode budget counted. Together
  they may hold at most :data:`MAX_EXIF_VALUES` numeric values that lie in the file (a camera's hold
  tens; values past the file's end Pillow skips, and a directory of 65,535 entries of junk, where a
  damaged file's pointer lands, took it 0.2 s: metadata is no reason to refuse an image).
- **PNG**: 8,000 iCCP chunks (each decompressed) took 5.1 s; 2.18 million empty private chunks 4.7 s
  and 252 MiB. The chunk headers are walked: at most one iCCP, :data:`MAX_PNG_ANCILLARY` ancillary
  chunks and :data:`MAX_PNG_CHUNKS` in all (a 25 MiB PNG in 8 KiB IDATs has about 3,200).
- **BMP**: run-length encoding is decoded in Python, a pixel or a padding byte a step (a 21 KB RLE8
  file of 5000x5000: 3.1 s): RLE4 and RLE8 BMPs are refused.

:func:`examined` says why an upload is refused, or None. The standard library only (the API process
imports this).
"""

from __future__ import annotations

import math
import struct

from ml import jpeg_scans

#: the most values a numeric TIFF tag other than the strips' or tiles' may hold (a 16-bit palette's
#: ColorMap holds 3 x 65,536)
MAX_TIFF_VALUES = 3 * 65536
#: the most numeric values a TIFF's EXIF, GPS and interoperability directories may hold together
#: (Pillow unpacks them all: 65,536 rationals took 0.17 s and 20 MiB)
MAX_EXIF_VALUES = 65536
#: the most entries the first TIFF directory may hold
MAX_TIFF_ENTRIES = 512
#: the most strips or tiles a TIFF may have (12,000 rows in strips of one, for four planes: 48,000)
MAX_TIFF_PARTS = 65536
MAX_PNG_CHUNKS = 65536
#: the entry count :func:`_tiff_directory` gives a first directory that repeats a tag or is cut short
MALFORMED = -1
#: ancillary chunks: text (a converter may write one a DICOM element, a few hundred) and the rest
MAX_PNG_ANCILLARY = 4096

#: TIFF's numeric field types (SHORT, LONG, RATIONAL, their signed kinds, SBYTE, FLOAT, DOUBLE, IFD,
#: LONG8...): those Pillow unpacks a value at a time (BYTE, ASCII and UNDEFINED it keeps as bytes)
_NUMERIC = frozenset((3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16, 17, 18))
_OFFSETS = {273: 279, 324: 325}  # StripOffsets: StripByteCounts, TileOffsets: TileByteCounts
#: the directories Pillow reads whole after decoding a TIFF: EXIF and GPS, pointed to from the first
#: directory, and interoperability, pointed to from the EXIF one (PIL.TiffTags.TAGS_V2_GROUPS)
_EXIF, _GPS, _INTEROP = 34665, 34853, 40965
#: the one-value types Pillow reads as a whole number, which it takes for a directory's place
_POINTERS = {3: "H", 4: "I", 8: "h", 9: "i", 13: "I"}
#: bytes a value of each numeric type (:data:`_NUMERIC`)
_UNIT = {3: 2, 4: 4, 5: 8, 6: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def examined(data: bytes, fmt: str) -> tuple[tuple[str, str] | None, int]:
    """Why ``data``, sniffed as ``fmt``, is refused before it is opened: (code, message), or None; and
    how many scans a JPEG has (1 for the other formats), which what its decode holds depends on
    (``ml.decode_budget.jpeg_coefficient_bytes``): the walk is done once for both."""
    if fmt == "JPEG":
        counted = jpeg_scans.walk(data)
        return _jpeg(counted), counted.scans
    return _other(data, fmt), 1


def _other(data: bytes, fmt: str) -> tuple[str, str] | None:
    if fmt == "TIFF":
        return _tiff(data)
    if fmt == "PNG":
        return _png(data)
    if fmt == "BMP" and len(data) >= 34 and _bmp_compression(data) in (1, 2):
        return "unsupported_format", "the BMP file is run-length encoded; send it uncompressed, or as PNG"
    return None


def _bmp_compression(data: bytes) -> int:
    """The compression field of a BMP's info header (0 for the old core header, which has none)."""
    return int.from_bytes(data[30:34], "little") if int.from_bytes(data[14:18], "little") >= 40 else 0


def _jpeg(counted: jpeg_scans.Walk) -> tuple[str, str] | None:
    if counted.scans > jpeg_scans.MAX_JPEG_SCANS:
        limit = jpeg_scans.MAX_JPEG_SCANS
        return "decompression_bomb", f"the JPEG file has more than {limit} scans; dermq decodes at most that many"
    if counted.markers > jpeg_scans.MAX_JPEG_MARKERS or counted.stray > jpeg_scans.MAX_JPEG_STRAY_BYTES:
        return "corrupt", "the JPEG file has more segments, or bytes between them, than a JPEG has"
    if counted.parsed.too_many():
        return (
            "corrupt",
            "the JPEG file has more frame headers, quantization tables, Photoshop resources or EXIF segments "
            "than a JPEG has; export the image again, without its metadata",
        )
    if counted.arithmetic:
        return "unsupported_format", "the JPEG file is arithmetic-coded; send a baseline or progressive JPEG"
    return None


def tiff_size(data: bytes) -> tuple[int, int] | None:
    """A TIFF's declared (width, height), read from its first directory as Pillow reads it; None when
    the directory cannot be read (Pillow says why). Checked before Pillow opens the file, which makes
    a tile of each strip or tile the header declares, inside ``Image.open``."""
    directory = _tiff_directory(data)
    if directory is None or directory[2] == MALFORMED:  # (refused by examined(), which says why)
        return None
    scalars = directory[0]
    return scalars.get(256, 0), scalars.get(257, 0)


def _tiff_directory(data: bytes) -> tuple[dict[int, int], dict[int, int], int] | None:
    """The first directory's one-value SHORT and LONG tags, every tag's count of values, and how many
    entries it has (:data:`MALFORMED` when it names a tag twice or runs past the file's end); None if
    its place cannot be read."""
    order = "<" if data[:2] == b"II" else ">"
    scalars: dict[int, int] = {}
    counts: dict[int, int] = {}
    try:
        (first,) = struct.unpack_from(order + "I", data, 4)
        (entries,) = struct.unpack_from(order + "H", data, first)
    except struct.error:
        return None
    if first + 2 + 12 * min(entries, MAX_TIFF_ENTRIES + 1) > len(data):
        # Pillow keeps the entries it could read, past any check made of them here
        return scalars, counts, MALFORMED
    try:
        for i in range(min(entries, MAX_TIFF_ENTRIES + 1)):
            tag, kind, values = struct.unpack_from(order + "HHI", data, first + 2 + 12 * i)
            if tag in counts:
                # Pillow keeps the first copy it can use, skipping one it cannot (no values, a type it
                # does not know, values past the end): which one counts is its to say, not a guess here
                return scalars, counts, MALFORMED
            counts[tag] = values
            if kind in _NUMERIC and values > MAX_TIFF_VALUES and tag not in _OFFSETS and tag not in _OFFSETS.values():
                entries = MAX_TIFF_ENTRIES + 1  # (a flood of numbers: refused as an overfull directory)
                break
            if values == 1 and kind in (3, 4):
                scalars[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, first + 10 + 12 * i)[0]
    except struct.error:
        return None
    return scalars, counts, entries


def _tiff(data: bytes) -> tuple[str, str] | None:
    directory = _tiff_directory(data)
    if directory is None:
        return None  # Pillow says what is wrong with it
    scalars, counts, entries = directory
    if entries == MALFORMED:
        return "corrupt", "the TIFF file's first directory names a tag twice or runs past the end of the file"
    if entries > MAX_TIFF_ENTRIES:
        return "corrupt", "the TIFF file's first directory has more entries, or values in one, than a TIFF has"
    width, height = scalars.get(256, 0), scalars.get(257, 0)
    planes = scalars.get(277, 1) if scalars.get(284, 1) == 2 else 1
    if 324 in counts:
        tile_w, tile_h = scalars.get(322, 0), scalars.get(323, 0)
        parts = math.ceil(width / tile_w) * math.ceil(height / tile_h) * planes if tile_w and tile_h else 0
    else:
        rows = scalars.get(278, 0) or height or 1
        parts = math.ceil(height / rows) * planes
    parts = min(parts, MAX_TIFF_PARTS)
    for offsets, sizes in _OFFSETS.items():
        for tag in (offsets, sizes):
            if counts.get(tag, 0) > parts:  # (fewer cost nothing: Pillow makes a tile an offset)
                return "corrupt", f"the TIFF file's tag {tag} holds {counts[tag]} values for {parts} strips or tiles"
    if _sub_directories_too_full(data):
        return "corrupt", "the TIFF file's EXIF or GPS directories hold more values than a TIFF's do"
    return None


def _sub_directories_too_full(data: bytes) -> bool:
    """Whether the EXIF, GPS and interoperability directories (those Pillow reads whole) hold more than
    :data:`MAX_EXIF_VALUES` numeric values in the file together. Each place is read once, however many
    pointers name it (Pillow reads it for each: its values count for each)."""
    order = "<" if data[:2] == b"II" else ">"
    read: dict[int, tuple[int, dict[int, int]] | None] = {}

    def at(place: int) -> tuple[int, dict[int, int]] | None:
        if place not in read:
            read[place] = _directory(data, order, place)
        return read[place]

    first = at(struct.unpack_from(order + "I", data, 4)[0])
    if first is None:
        return False
    pointers = first[1]
    places = [pointers[tag] for tag in (_EXIF, _GPS) if tag in pointers]
    exif = at(pointers[_EXIF]) if _EXIF in pointers else None
    if exif is not None and _INTEROP in exif[1]:
        places.append(exif[1][_INTEROP])
    values = 0
    for place in places:
        directory = at(place)
        values += 0 if directory is None else directory[0]  # (None: Pillow cannot read it either)
        if values > MAX_EXIF_VALUES:
            return True
    return False


def _directory(data: bytes, order: str, place: int) -> tuple[int, dict[int, int]] | None:
    """The directory at ``place``: how many numeric values its tags hold in the file, and its one-value
    whole-number tags; None if its place cannot be read."""
    if place < 0:
        return None  # (Pillow cannot seek there)
    try:
        (entries,) = struct.unpack_from(order + "H", data, place)
    except struct.error:
        return None
    start = place + 2
    whole = max(0, min(entries, (len(data) - start) // 12))  # Pillow keeps the entries it could read
    numeric, pointers = 0, {}
    for i, (tag, kind, values, value) in enumerate(
        struct.iter_unpack(order + "HHII", data[start : start + 12 * whole])
    ):
        unit = _UNIT.get(kind)
        if unit is None:
            continue
        if values == 1 and kind in _POINTERS:
            pointers[tag] = struct.unpack_from(order + _POINTERS[kind], data, start + 8 + 12 * i)[0]
        size = values * unit
        if size <= 4 or value + size <= len(data):
            numeric += values
    return numeric, pointers


def _png(data: bytes) -> tuple[str, str] | None:
    pos, chunks, ancillary, profiles = 8, 0, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        ancillary += kind[0] >= 0x61  # a lower-case first letter
        profiles += kind == b"iCCP"
        if chunks > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY or profiles > 1:
            return "corrupt", "the PNG file has more chunks, or colour profiles, than a PNG has"
        if kind == b"IEND":
            break
        pos += 12 + length
    return None
