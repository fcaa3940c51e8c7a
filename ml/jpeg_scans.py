"""Counting a JPEG's scans before it is decoded.

A progressive JPEG's decoder reads every block of the image again for each scan, and libjpeg accepts
a scan repeated any number of times (a warning, not an error): 1,000 copies of a 50-byte scan make a
52 KB file that takes seconds to decode, and a 25 MiB one hours. :func:`ml.images.decode` refuses a
JPEG with more than :data:`MAX_JPEG_SCANS` scans, or more than :data:`MAX_JPEG_MARKERS` markers
outside them, before any pixel is decoded; encoders write 1 to about 20 scans.

Pillow reads the segments before the first scan in Python, and four kinds a value at a time (measured
with Pillow 13 on this project's 2-core VM, against 0.2 s for a real 22 MiB JPEG of 12 megapixels):
frame headers (every three bytes after the sixth made a component, in a list kept with the image,
whatever number the header declares: 24 MiB of SOF segments, 5 to 7 s and 700 MiB), quantization
tables (25 MiB of DQT segments: 3.2 s, each segment's rest copied after each table), Photoshop
resources in APP13 (25 MiB of empty ones, 2.2 million: 4.0 s) and EXIF in APP1 (each segment's bytes
joined onto all before it: 400 segments, 1.4 s). The walk counts them too (:class:`Parsed`).

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

#: the most bytes of frame headers (SOF and DHP segments) before the first scan: libjpeg reads one
#: frame, of at most 6 + 3 x 255 bytes (a photo's: 12 or 15)
MAX_JPEG_FRAME_BYTES = 1024
#: the most bytes of quantization tables (DQT segments) before the first scan: a JPEG has 2 to 4
#: tables of 65 or 129 bytes. 64 KiB, one segment's worth (Pillow: about 10 ms)
MAX_JPEG_TABLE_BYTES = 64 * 1024
#: the most Photoshop image resources (``8BIM`` blocks in APP13 ``Photoshop 3.0`` segments) before the
#: first scan: an editor writes tens, a thumbnail one of them (Pillow: about 2 us each)
MAX_PHOTOSHOP_RESOURCES = 4096
#: the most EXIF APP1 segments before the first scan: the standard has one (64 KiB at most), a few
#: writers split a larger block (16 joined, 1 MiB: about 5 ms)
MAX_EXIF_SEGMENTS = 16

#: the markers Pillow reads as a frame header (``JpegImagePlugin.SOF``)
_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE))
_EXIF = b"Exif\x00\x00"
_PHOTOSHOP = b"Photoshop 3.0\x00"

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


class Parsed(NamedTuple):
    """The segments before the first scan that Pillow parses a value at a time: the bytes of the frame
    headers and of the quantization tables, the Photoshop resources (an upper bound: each ``8BIM`` in
    their segments), the EXIF segments."""

    frames: int = 0
    tables: int = 0
    resources: int = 0
    exif: int = 0

    def too_many(self) -> bool:
        return (
            self.frames > MAX_JPEG_FRAME_BYTES
            or self.tables > MAX_JPEG_TABLE_BYTES
            or self.resources > MAX_PHOTOSHOP_RESOURCES
            or self.exif > MAX_EXIF_SEGMENTS
        )

    def counted(self, data: bytes, marker: int, start: int, end: int) -> Parsed:
        """These counts with the segment of ``marker`` whose payload is ``data[start:end]``."""
        if marker in _FRAMES:
            return self._replace(frames=self.frames + max(0, end - start))
        if marker == 0xDB:
            return self._replace(tables=self.tables + max(0, end - start))
        if marker == 0xE1 and data.startswith(_EXIF, start):
            return self._replace(exif=self.exif + 1)
        if marker == 0xED and data.startswith(_PHOTOSHOP, start):
            return self._replace(resources=self.resources + data.count(b"8BIM", start, end))
        return self


class Walk(NamedTuple):
    """What :func:`walk` counted: the scans (at most one past :data:`MAX_JPEG_SCANS`), the markers
    outside the scans' data (at most one past :data:`MAX_JPEG_MARKERS`), the bytes between segments
    (:data:`MAX_JPEG_STRAY_BYTES`; a run of :data:`FILL_RUN` in a scan's data counts as more), and
    whether a frame is arithmetic-coded; and what Pillow's header parse reads a value at a time
    (:class:`Parsed`)."""

    scans: int
    markers: int
    stray: int
    arithmetic: bool = False
    parsed: Parsed = Parsed()


def walk(data: bytes) -> Walk:
    """The scan headers (SOS markers) and other markers of a JPEG's first image, counted by walking its
    segments as libjpeg reads them, up to the image's end marker (past a stream of tables only); the
    walk stops once a count is past its limit. What follows the end is not counted: a phone's motion
    photo appends an MP4, a multi-picture file more JPEGs, whose bytes hold the SOS pair by chance
    (16 times a MiB)."""
    scans = markers = stray = 0
    arithmetic = False
    parsed = Parsed()
    pos, run = 2, -1  # run: where the next FILL_RUN starts (the data's end if none), found once, kept
    too_far = MAX_JPEG_STRAY_BYTES + 2  # each search for a marker looks no further than this
    while scans <= MAX_JPEG_SCANS and markers <= MAX_JPEG_MARKERS and stray <= MAX_JPEG_STRAY_BYTES:
        if parsed.too_many():
            break
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
        length = int.from_bytes(data[pos : pos + 2], "big")  # the segment's, its length field included
        if scans == 0:  # (Pillow's header parse stops at the first scan; libjpeg reads the rest in C)
            parsed = parsed.counted(data, marker, pos + 2, pos + length)
        pos += length
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
    return Walk(scans, markers, stray, arithmetic, parsed)
