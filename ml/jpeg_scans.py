"""Counting a JPEG's scans before it is decoded.

A progressive JPEG's decoder reads every block of the image again for each scan, and libjpeg accepts
a scan repeated any number of times (a warning, not an error): 1,000 copies of a 50-byte scan make a
52 KB file that takes seconds to decode, and a 25 MiB one hours. :func:`ml.images.decode` refuses a
JPEG with more than :data:`MAX_JPEG_SCANS` scans before any pixel is decoded; encoders write 1 to
about 20.

The standard library only (the API process imports this).
"""

from __future__ import annotations

import re

#: the most scan headers (SOS markers) a JPEG upload may hold
MAX_JPEG_SCANS = 64

#: the next marker as libjpeg finds it (``next_marker``): bytes before an 0xFF skipped (a warning),
#: fill bytes too (the last 0xFF of a run is the marker's), and 0xFF followed by a stuffed zero is
#: not one. Single-byte classes after a literal: a repeat (``\xff+``) made the search ten times slower
_MARKER = re.compile(rb"\xff([\x01-\xfe])")
#: where a scan's entropy-coded data ends: the next marker that is not a restart marker
_SCAN_END = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


def jpeg_scans(data: bytes) -> int:
    """The scan headers (SOS markers) of a JPEG's first image, counted by walking its segments as
    libjpeg reads them, up to the image's end marker (counting stops past :data:`MAX_JPEG_SCANS`).
    What follows the end is not counted: a phone's motion photo appends an MP4, a multi-picture file
    more JPEGs, whose bytes hold the SOS pair by chance (16 times a MiB)."""
    scans, pos = 0, 2
    while scans <= MAX_JPEG_SCANS:
        found = _MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = found[1][0], found.end()
        if marker == 0xD9:  # the end of the image
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the segment, its length field included
        if marker == 0xDA:  # the scan's header; its entropy-coded data runs to the next marker
            scans += 1
            end = _SCAN_END.search(data, pos)
            if end is None:
                break
            pos = end.start()
    return scans
