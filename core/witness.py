"""The witness file: every signed checkpoint the sealers made, appended in the order they made them.

Put the file where the database login cannot write (another volume, a log shipper, ``chattr +a``):
a checkpoint there proves the log's past to anyone holding the verifier key. Each note is appended
whole and fsynced, then a blank line; the file is opened for each append, so it may be rotated by
renaming it (logrotate's default; never ``copytruncate``, which can cut a note in half). Keep the
rotated files: they are older evidence (``dermq audit verify --against`` takes a note of theirs).

The periodic check reads the file from its end, as far back as the trees it has not verified yet
(:func:`notes`), so its cost does not grow with the file. What a tail read cannot see, a log rewound
and sealed again (notes of smaller trees after larger ones), the check's forward scan of what was
appended since its last run catches (:mod:`core.witness_scan`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from core.checkpoint import DASH

#: bytes read from the end of the file at first; each further read takes four times as much
BLOCK = 1 << 16
#: bytes a tail read takes at most: a check far behind the file's end (catching up) compares with the
#: stored checkpoints there, and the scan compared each of those notes with the stored tree already
TAIL_BYTES = 16 << 20
#: notes of a tree smaller than the one asked for that a tail read goes past before it stops: sealers
#: that run at once (a worker's children) append their notes in the order they finish, a few apart
SLACK = 16
#: digits of the largest tree size a note may claim (a tree of 2**64 events has 20)
MAX_SIZE_DIGITS = 20
_BOUNDARY = b"\n\n"
_SIGNATURE = (DASH + " ").encode()


def append(path: Path, note: str) -> None:
    """Append one signed checkpoint (and a blank line) to the witness file, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        end = os.fstat(fd).st_size
        # a crash in the middle of an append left a note without its end: start this one apart from
        # it, or its first line would join the torn one's last and neither would verify
        torn = end > 0 and os.pread(fd, 2, max(0, end - 2)) != _BOUNDARY
        data = memoryview(((_BOUNDARY.decode() if torn else "") + note + "\n").encode())
        while data:  # a short write (a full disk, a signal) would leave half a note for the next to garble
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_notes(text: str) -> list[str]:
    """Split a file of concatenated signed notes (a witness file) into notes."""
    return list(_split(text.splitlines(keepends=True)))


def _split(lines: Iterable[str]) -> Iterator[str]:
    current: list[str] = []
    in_signatures = False
    for line in lines:
        if in_signatures and not line.startswith(DASH + " "):
            yield "".join(current)
            current, in_signatures = [], False
        if not current and line == "\n":
            continue
        if current and line == "\n" and not in_signatures:
            in_signatures = True
        current.append(line)
    if current:
        yield "".join(current)


def note_size(note: str) -> int:
    """The tree size a signed note claims (its second line), unverified; -1 when it has none (or one
    longer than any tree's: a line of thousands of digits is past what ``int`` reads, and stopped the
    check with a traceback instead of a verdict)."""
    lines = note.split("\n", 2)
    size = lines[1] if len(lines) > 2 else ""
    return int(size) if size.isascii() and size.isdigit() and len(size) <= MAX_SIZE_DIGITS else -1


def notes(path: Path | None, since: int = 0) -> Iterator[str]:
    """The notes of the witness file at ``path`` (none if it does not exist), unverified.

    With ``since`` > 0 the file is read from its end only as far as it takes to hold every note of a
    tree of ``since`` events or more appended in order, and :data:`SLACK` notes of smaller trees before
    them; notes of smaller trees may be among those given (the caller filters them). With 0 the whole
    file is read, a line at a time. The file is opened, and its length taken, when this is called:
    notes appended (or a file rotated in) afterwards are not read, so a reader that looks at the
    database after this call sees every checkpoint the notes it gets name."""
    if path is None:
        return iter(())
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return iter(())
    return _read(file, since, os.fstat(file.fileno()).st_size)


def _read(file: IO[bytes], since: int, end: int) -> Iterator[str]:
    with file:
        if since <= 0:
            yield from _split(line.decode("utf-8", errors="replace") for line in _lines(file, end))
        else:
            yield from _tail(file, since, end)


def _lines(file: IO[bytes], end: int) -> Iterator[bytes]:
    """The file's lines in its first ``end`` bytes (the last one cut there)."""
    left = end
    for line in file:
        if len(line) >= left:
            yield line[:left]
            return
        left -= len(line)
        yield line


def _tail(file: IO[bytes], since: int, end: int) -> list[str]:
    block = min(BLOCK, TAIL_BYTES)
    while True:
        start = max(0, end - block)
        file.seek(start)
        data = file.read(end - start)
        if start > 0:
            data = data[_after_first_note_end(data) :]
        found = read_notes(data.decode("utf-8", errors="replace"))
        if start == 0 or block >= TAIL_BYTES or sum(note_size(note) < since for note in found) >= SLACK:
            return found
        block = min(block * 4, TAIL_BYTES)


def end_of_last_note(data: bytes) -> int:
    """The offset just after the last whole note in ``data`` (0 when it holds none): a read that
    stops in the middle of a note keeps none of it."""
    at = data.rfind(_BOUNDARY)
    while at >= 0:
        if _ends_a_note(data, at):
            return at + len(_BOUNDARY)
        at = data.rfind(_BOUNDARY, 0, at)
    return 0


def _after_first_note_end(data: bytes) -> int:
    """The offset just after the first note's end in ``data`` (a signature line, then a blank line);
    ``len(data)`` when ``data`` holds none, so that a read starting mid-note keeps no part of it."""
    at = data.find(_BOUNDARY)
    while at >= 0:
        if _ends_a_note(data, at):
            return at + len(_BOUNDARY)
        at = data.find(_BOUNDARY, at + 1)
    return len(data)


def _ends_a_note(data: bytes, at: int) -> bool:
    """Whether the blank line at ``at`` ends a note: the line before it is a signature (a blank line
    after the note's text, before its signatures, does not)."""
    return data.startswith(_SIGNATURE, data.rfind(b"\n", 0, at) + 1)
