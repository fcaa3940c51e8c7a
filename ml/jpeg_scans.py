"""Counting a JPEG's scans before it is decoded.

A progressive JPEG's decoder reads every block of the image again for each scan, and libjpeg accepts
a scan repeated any number of times (a warning, not an error): 1,000 copies of a 50-byte scan make a
52 KB file that takes seconds to decode, and a 25 MiB one hours. :func:`ml.images.decode` refuses a
JPEG with more than :data:`MAX_JPEG_SCANS` scans, or more than :data:`MAX_JPEG_MARKERS` markers
outside them, before any pixel is decoded; encoders write 1 to about 20 scans.

The standard library only (the API process imports this).
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: the most scan headers (SOS markers) a JPEG upload may hold
MAX_JPEG_SCANS = 64
#: the most markers its segments may hold outside the scans' data: a JPEG has tens (a progressive one
#: a table or two a scan), and the walk is a Python step a marker
MAX_JPEG_MARKERS = 1024
#: the most bytes that may lie between its segments (fill bytes and stray ones, which libjpeg skips
#: with a warning): Pillow's own header parse reads them a byte at a time in Python, 0.3 us each
MAX_JPEG_STRAY_BYTES = 64 * 1024

#: the next marker as libjpeg finds it (``next_marker``): bytes before an 0xFF skipped (a warning),
#: fill bytes too (the last 0xFF of a run is the marker's), and 0xFF followed by a stuffed zero is
#: not one. Single-byte classes after a literal: a repeat (``\xff+``) made the search ten times slower
_MARKER = re.compile(rb"\xff([\x01-\xfe])")
#: where a scan's entropy-coded data ends: the next marker from 0xC0 up that is not a restart marker.
#: libjpeg discards one below 0xC0 met in a scan (``jpeg_resync_to_restart``) and reads on, without
#: a length: a walk that ended the scan there and skipped a "length" could land on an end marker
#: hidden in a later segment and miss every scan after it
_SCAN_END = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")


#: a run of fill bytes inside a scan's data at least this long is refused: encoders stuff an 0xFF of
#: data as FF 00, so entropy-coded data holds no run, and libjpeg's fill loop has no point where
#: Pillow's feed can resume, so Pillow feeds a long run again and again (25 MiB: 3 s, quadratic)
FILL_RUN = b"\xff" * 64
#: frame markers of arithmetic coding (SOF9-11, SOF13-15): per block and scan about ten times Huffman's
#: cost, and Pillow cannot feed libjpeg's arithmetic decoder a scan longer than its 64 KiB blocks anyway
ARITHMETIC = frozenset((0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


class Walk(NamedTuple):
    """What :func:`walk` counted: the scans (at most one past :data:`MAX_JPEG_SCANS`), the markers
    outside the scans' data (at most one past :data:`MAX_JPEG_MARKERS`), the bytes between segments
    (:data:`MAX_JPEG_STRAY_BYTES`; a run of :data:`FILL_RUN` in a scan's data counts as more), and
    whether a frame is arithmetic-coded."""

    scans: int
    markers: int
    stray: int
    arithmetic: bool = False


def walk(data: bytes) -> Walk:
    """The scan headers (SOS markers) and other markers of a JPEG's first image, counted by walking its
    segments as libjpeg reads them, up to the image's end marker (past a stream of tables only); the
    walk stops once a count is past its limit. What follows the end is not counted: a phone's motion
    photo appends an MP4, a multi-picture file more JPEGs, whose bytes hold the SOS pair by chance
    (16 times a MiB)."""
    scans = markers = stray = 0
    arithmetic = False
    pos, run = 2, -1  # run: where the next FILL_RUN starts (the data's end if none), found once, kept
    too_far = MAX_JPEG_STRAY_BYTES + 2  # each search for a marker looks no further than this
    while scans <= MAX_JPEG_SCANS and markers <= MAX_JPEG_MARKERS and stray <= MAX_JPEG_STRAY_BYTES:
        found = _MARKER.search(data, pos, pos + too_far)
        if found is None:
            stray += min(len(data) - pos, too_far)  # (past the limit unless the data ends first)
            break
        stray += found.start() - pos
        marker, pos = found[1][0], found.end()
        markers += 1
        if marker == 0xD9:  # the end of the image
            if scans == 0 and data[pos : pos + 2] == b"\xff\xd8":
                # a stream of tables only, which ends before any scan: libjpeg (jpeg_read_header, called
                # again by Pillow) reads the image that starts right after it
                pos += 2
                continue
            break
        if marker < 0xC0 or 0xD0 <= marker <= 0xD8:  # no length (below 0xC0 libjpeg refuses all but TEM)
            continue
        arithmetic = arithmetic or marker in ARITHMETIC
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the segment, its length field included
        if marker == 0xDA:  # the scan's header; its entropy-coded data runs to the next marker
            scans += 1
            if run < pos:
                found_run = data.find(FILL_RUN, pos)
                run = len(data) if found_run < 0 else found_run
            # searched only up to a run of fill bytes, where the search would crawl (a tenth of its speed)
            end = _SCAN_END.search(data, pos, run)
            if end is None:  # the data ends, or a run of fill bytes comes first
                stray += 0 if run == len(data) else MAX_JPEG_STRAY_BYTES + 1
                break
            pos = end.start()
    return Walk(scans, markers, stray, arithmetic)
