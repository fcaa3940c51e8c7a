"""The witness file: every signed checkpoint the sealers made, appended in the order they made them.

Put the file where the database login cannot write (another volume, a log shipper, ``chattr +a``):
a checkpoint there proves the log's past to anyone holding the verifier key. Each note is appended
whole and fsynced, then a blank line; the file is opened for each append, so it may be rotated by
renaming it (logrotate's default; never ``copytruncate``, which can cut a note in half).

The periodic check reads it from its end (:func:`notes`): only the checkpoints of the trees it has
not verified yet matter to it, and the file grows by a note a second while events come in.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.checkpoint import DASH

#: bytes read from the end of the file at first; each further read takes four times as much
BLOCK = 1 << 16
#: notes of a tree smaller than the one asked for that a tail read goes past before it stops: sealers
#: that run at once (a worker's children) append their notes in the order they finish, a few apart
SLACK = 16
_BOUNDARY = b"\n\n"
_SIGNATURE = (DASH + " ").encode()


def append(path: Path, note: str) -> None:
    """Append one signed checkpoint (and a blank line) to the witness file, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        data = memoryview((note + "\n").encode())
        while data:  # a short write (a full disk, a signal) would leave half a note for the next to garble
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_notes(text: str) -> list[str]:
    """Split a file of concatenated signed notes (a witness file) into notes."""
    notes: list[str] = []
    current: list[str] = []
    in_signatures = False
    for line in text.splitlines(keepends=True):
        if in_signatures and not line.startswith(DASH + " "):
            notes.append("".join(current))
            current, in_signatures = [], False
        if not current and line == "\n":
            continue
        if current and line == "\n" and not in_signatures:
            in_signatures = True
        current.append(line)
    if current:
        notes.append("".join(current))
    return notes


def note_size(note: str) -> int:
    """The tree size a signed note claims (its second line), unverified; -1 when it has none."""
    lines = note.split("\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isascii() and lines[1].isdigit() else -1


def notes(witness: Path | str | None, since: int = 0) -> list[str]:
    """The notes of a witness, unverified: a file's (none if it does not exist) or a text's.

    With ``since``, a file is read from its end only as far as it takes to hold every note of a tree
    of ``since`` events or more, and :data:`SLACK` notes of smaller trees before them; notes of smaller
    trees may be among those returned (the caller filters them)."""
    if witness is None:
        return []
    if isinstance(witness, str):
        return read_notes(witness)
    try:
        file = witness.open("rb")
    except FileNotFoundError:
        return []
    with file:
        end = os.fstat(file.fileno()).st_size
        block = end if since <= 0 else BLOCK
        while True:
            start = max(0, end - block)
            file.seek(start)
            data = file.read(end - start)
            if start > 0:
                data = data[_after_first_note_end(data) :]
            found = read_notes(data.decode("utf-8", errors="replace"))
            if start == 0 or sum(note_size(note) < since for note in found) >= SLACK:
                return found
            block *= 4


def _after_first_note_end(data: bytes) -> int:
    """The offset just after the first note's end in ``data`` (a signature line, then a blank line);
    ``len(data)`` when ``data`` holds none, so that a read starting mid-note keeps no part of it."""
    at = data.find(_BOUNDARY)
    while at >= 0:
        line_start = data.rfind(b"\n", 0, at) + 1
        if data.startswith(_SIGNATURE, line_start):
            return at + len(_BOUNDARY)
        at = data.find(_BOUNDARY, at + 1)
    return len(data)
