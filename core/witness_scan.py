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

from core.checkpoint import Checkpoint, CheckpointError, Verifier, parse
from core.witness import end_of_last_note, read_notes

#: bytes of the file read at most per check: a file from before this scan existed, or one that
#: grew for a long time without a check, is read over several checks
SCAN_BYTES = 16 << 20
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
        if saved is not None and highest is None:
            # signed with a key this process does not hold yet (a rotation rolling out): scan nothing
            return Scanned(None, None, unverified=True)
        if state.get("problem"):
            return Scanned(highest, str(state["problem"]))
        read = _next(witness, state)
        problem: str | None
        if isinstance(read, str):
            problem, kept, identity, offset = read, highest, state.get("file"), state.get("offset", 0)
        elif read is None:
            return Scanned(highest, None)
        else:
            identity, start, data = read
            whole = end_of_last_note(data)  # a note cut in two by the read's end is read whole next time
            problem, kept = _judge(highest, list(_signed(data[:whole], verifiers)), root_at)
            offset = start + whole
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


def _identity(path: Path) -> list[object] | None:
    """[device, inode, digest of the first HEAD_BYTES] of the file at ``path``; None if there is none."""
    try:
        with path.open("rb") as file:
            status = os.fstat(file.fileno())
            head = file.read(HEAD_BYTES)
    except FileNotFoundError:
        return None
    return [status.st_dev, status.st_ino, hashlib.sha256(head).hexdigest()[:16], len(head)]


def _same(identity: list[object], path: Path) -> bool:
    """Whether ``path`` is the file ``identity`` was taken of (its start may have grown since)."""
    found = _identity(path)
    if found is None or found[:2] != identity[:2]:
        return False
    with path.open("rb") as file:
        head = file.read(int(str(identity[3])))
    return hashlib.sha256(head).hexdigest()[:16] == identity[2]


def _next(witness: Path, state: dict[str, object]) -> tuple[list[object], int, bytes] | str | None:
    """(the identity of the file read, the offset read from, the bytes) of what comes next: the rest of
    the file the last scan read, if it was renamed since, else what was appended to ``witness``; a
    problem; or None when there is no file yet."""
    kept = state.get("file")
    saved = list(kept) if isinstance(kept, list) and len(kept) == 4 else None
    offset = int(str(state.get("offset", 0))) if saved is not None else 0
    path = witness
    if saved is not None and not _same(saved, witness):
        old = _find(witness.parent, saved)
        if old is None:
            return (
                "the witness file was rotated, and the file it was renamed to is gone (compressed or deleted) "
                "before this check read all of it: keep the last rotated file as it is (logrotate's delaycompress)"
            )
        path = old
        if offset >= old.stat().st_size:  # read to its end: go on with the new file from its start
            path, saved, offset = witness, None, 0
    if saved is None:
        saved = _identity(witness)
        if saved is None:
            return None
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < offset:
            return "the witness file is shorter than this check last read it: it was cut (never copytruncate it)"
        file.seek(offset)
        return saved, offset, file.read(min(SCAN_BYTES, size - offset))


def _find(folder: Path, identity: list[object]) -> Path | None:
    """The file in ``folder`` that ``identity`` was taken of, if it is still there."""
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and _same(identity, Path(entry.path)):
                    return Path(entry.path)
    return None


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
