"""The periodic check's forward scan of the witness file: the largest checkpoint it holds, kept
beside it, and a log rewound and sealed again caught at the next check.

A tail read (:func:`core.witness.notes`) gives the notes of the trees a check has not verified, as long
as the log only grows. An insider who owns the tables can rewind it (delete the newest events, their
leaves, nodes and checkpoints) and let the sealer go on: the sealer then appends checkpoints of a new
history, signed with the real key, after the old ones, and a check resumed at one of the new
checkpoints would not read back to the old ones. So each check also reads, once, what was appended
since the last one, and keeps in ``<witness file>.scan`` (on the witness's volume, where the database
login cannot write) how far it read and the largest checkpoint so far. Each checkpoint read, and the
largest one, must be the root of the stored tree (``audit_nodes``) at its size: the old history's and
the new one's cannot both be. A failure is kept in the file, and every later check fails with it,
until an operator has looked and removes the file (deploy/RUNBOOK.md, DermqAuditChainBroken).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from core.checkpoint import Checkpoint, CheckpointError, Verifier, parse
from core.witness import end_of_last_note, read_notes

#: bytes of the file read at most per check: a file from before this scan existed, or one that
#: grew for a long time without a check, is read over several checks. About 19,000 notes, each
#: compared with the stored tree (a node or two read from Postgres per note, the rest cached; not
#: measured at that size), beside the walk's 30 s under the task's time limit
SCAN_BYTES = 4 << 20
#: the stored tree's root at a size (None: the stored tree is smaller, or lacks a node it needs)
RootAt = Callable[[int], bytes | None]


@dataclass(frozen=True)
class Signed:
    """A checkpoint and the note it was read from."""

    checkpoint: Checkpoint
    note: str

    @property
    def size(self) -> int:
        return self.checkpoint.size


@dataclass(frozen=True)
class Scanned:
    #: the largest checkpoint the witness file has held (signature checked), or None
    highest: Signed | None
    #: why the file shows a rewound log, or None
    problem: str | None
    #: the largest checkpoint kept is signed with a key this process does not hold: nothing was read
    unverified: bool = False


def state_path(witness: Path) -> Path:
    return witness.with_name(witness.name + ".scan")


def scan(witness: Path, verifiers: Sequence[Verifier], root_at: RootAt) -> Scanned:
    """Read what was appended to ``witness`` since the last scan (at most :data:`SCAN_BYTES`) and
    return the largest checkpoint it has held and any problem. Every checkpoint read, and the largest
    before them, must be ``root_at`` its size: the stored tree's root there. A file renamed since the
    last scan (rotated) is read to its end first, found in its folder by its identity; one that is
    gone, or cut short, is a problem: what it held past the last scan was never compared."""
    target = state_path(witness)
    with _locked(target):
        state = _load(target)
        saved = state.get("highest")
        highest = _parse(saved, verifiers)
        if state.get("problem"):
            return Scanned(highest, str(state["problem"]))
        if saved is not None and highest is None:
            # signed with a key this process does not hold (yet: a rotation rolling out): scan nothing
            return Scanned(None, None, unverified=True)
        read = _next(witness, state)
        problem: str | None
        if isinstance(read, str):
            problem, kept, identity, offset = read, highest, state.get("file"), state.get("offset", 0)
        elif read is None:
            return Scanned(highest, None)
        else:
            whole = end_of_last_note(read.data)  # a note cut in two by the read's end is read whole next time
            if read.renamed and read.start + len(read.data) == read.size:
                whole = len(read.data)  # a renamed file's end: a torn note there gets no end any more
            problem, kept = _judge(highest, list(_signed(read.data[:whole], verifiers)), root_at)
            identity, offset = read.identity, read.start + whole
        _store(
            target,
            {
                "file": identity,
                "offset": offset,
                "highest": kept.note if kept is not None else None,
                "problem": problem,
            },
        )
        return Scanned(kept, problem)


#: bytes at a file's start that, with its device and inode, tell it apart from a later file that
#: reuses the inode of one deleted
HEAD_BYTES = 128


@dataclass(frozen=True)
class _Read:
    identity: list[object]  # [device, inode, digest of the head, the head's length]
    start: int
    data: bytes
    size: int
    renamed: bool  # read from the file the last scan read, renamed since


def _opened(path: Path) -> tuple[IO[bytes], list[object]] | None:
    """The file at ``path``, open, and its identity (taken of the open file); None if there is none."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None
    status = os.fstat(file.fileno())
    head = os.pread(file.fileno(), HEAD_BYTES, 0)
    return file, [status.st_dev, status.st_ino, _digest(head), len(head)]


def _digest(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()[:16]


def _same_start(saved: list[object], file: IO[bytes]) -> bool:
    """Whether ``file`` starts with the head ``saved`` was taken of."""
    return _digest(os.pread(file.fileno(), int(str(saved[3])), 0)) == saved[2]


def _next(witness: Path, state: dict[str, object]) -> _Read | str | None:
    """What comes next: the rest of the file the last scan read, if it was renamed since, else what was
    appended to ``witness``; a problem; or None when there is nothing to read."""
    kept = state.get("file")
    saved = list(kept) if isinstance(kept, list) and len(kept) == 4 else None
    offset = int(str(state.get("offset", 0))) if saved is not None else 0
    current = _opened(witness)
    try:
        if saved is not None and (current is None or current[1][:2] != saved[:2] or not _same_start(saved, current[0])):
            old = _find(witness.parent, saved, offset)
            if old is None:
                return (
                    "the witness file was rotated, and the file it was renamed to is gone (compressed or "
                    "deleted) before this check read all of it: keep the last rotated file as it is "
                    "(logrotate's delaycompress)"
                )
            file, identity = old
            with file:
                size = os.fstat(file.fileno()).st_size
                if offset < size:  # (a file found under a new device number may be the current one)
                    renamed = current is None or identity[:2] != current[1][:2]
                    return _Read(identity, offset, _read(file, offset, size), size, renamed)
            saved, offset = None, 0  # the renamed file is read to its end: go on with the new one
        if current is None:
            return None
        file, identity = current
        if saved is not None and int(str(saved[3])) < HEAD_BYTES:
            saved = identity  # taken while the file was shorter: its longer head tells it apart better
        size = os.fstat(file.fileno()).st_size
        if size < offset:
            return "the witness file is shorter than this check last read it: it was cut (never copytruncate it)"
        return _Read(saved or identity, offset, _read(file, offset, size), size, False)
    finally:
        if current is not None:
            current[0].close()


def _read(file: IO[bytes], offset: int, size: int) -> bytes:
    return os.pread(file.fileno(), min(SCAN_BYTES, size - offset), offset)


def _find(folder: Path, saved: list[object], offset: int) -> tuple[IO[bytes], list[object]] | None:
    """The file in ``folder`` that ``saved`` was taken of, open: the one with its device, inode and
    head; else one with its head and at least ``offset`` bytes (a device renumbered by a reboot, a
    volume copied to another host)."""
    fallback = None
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            opened = _opened(Path(entry.path))
            if opened is None:
                continue
            file, identity = opened
            exact = identity[:2] == saved[:2]
            if _same_start(saved, file) and (exact or os.fstat(file.fileno()).st_size >= offset):
                if exact:
                    if fallback is not None:
                        fallback[0].close()
                    return opened
                if fallback is None:
                    fallback = opened
                    continue
            file.close()
    return fallback


def _judge(highest: Signed | None, notes: list[Signed], root_at: RootAt) -> tuple[str | None, Signed | None]:
    """(the problem, the largest checkpoint) once ``notes`` are read: each of them, and the largest
    before them, must be the stored tree's root at its size."""
    largest = highest
    for note in [*([highest] if highest is not None else []), *notes]:
        stored = root_at(note.size)
        if stored is None:
            return (
                f"the log holds fewer than the {note.size} events of a checkpoint the witness file holds: it "
                "was rewound (or restored)",
                highest,
            )
        if stored != note.checkpoint.root:
            return (
                f"the log's first {note.size} events are not those of the witness file's checkpoint of that "
                "size: the log was rewound (or restored) and sealed again",
                highest,
            )
        if largest is None or note.size > largest.size:
            largest = note
    return None, largest


def _signed(data: bytes, verifiers: Sequence[Verifier]) -> Iterator[Signed]:
    for note in read_notes(data.decode("utf-8", errors="replace")):
        parsed = _parse(note, verifiers)
        if parsed is not None:
            yield parsed


def _parse(note: object, verifiers: Sequence[Verifier]) -> Signed | None:
    if not isinstance(note, str):
        return None
    try:
        return Signed(parse(note, list(verifiers)), note)
    except CheckpointError:
        return None  # a note nobody signed proves nothing


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one scan at a time: a worker's children share the file
        yield


def _load(target: Path) -> dict[str, object]:
    try:
        loaded = json.loads(target.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _store(target: Path, state: dict[str, object]) -> None:
    temporary = target.with_name(target.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, json.dumps(state).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
