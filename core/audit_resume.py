"""Where the periodic audit check resumes, and what lets it: its stored results, and the proofs that
a resume point is part of the log's one history.

Each check's result is a row of ``audit_verifications`` (what ``GET /v1/audit-events/verify``
answers). Where the check resumes is also kept beside the witness file, ``<witness>.check``
(:mod:`core.audit_places`), where the database's logins cannot write: a "good" row the services'
login or the tables' owner inserted, at a signed checkpoint's size past what was checked, had the next
check resume there and never recompute the events in between. The rows may pull the place back (a
failure recorded by another worker pod, each of which keeps its own file), never push it forward. A
"good" row inserted after a failure still lets a pod whose file lies past the failed position pass
it (the pod that found it fails again: the verdict flips with the pod that runs the check). Without a
witness file, or before a process has one (a new pod), the place is read from the rows: no defence
against an insider there. Either way a place counts only where a signed checkpoint vouches for its
root and its tree extends the largest tree the witness file has held (:mod:`core.witness_scan`);
else the check walks the whole log again.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from core import audit_log, audit_places, merkle
from core.audit_roots import RootStream
from core.checkpoint import Checkpoint

if TYPE_CHECKING:
    from core.audit_verify import LogReport


def report_row(session: Session, report: LogReport) -> None:
    """Store a verification result (the API's ``/verify`` answer, and what :func:`resume_point` reads)."""
    session.execute(
        text(
            "INSERT INTO audit_verifications (ok, size, root, checked, first_bad_seq, first_bad_event_id, reason, "
            "frontier, complete) VALUES (:ok, :size, :root, :checked, :seq, :eid, :reason, CAST(:frontier AS jsonb), "
            ":complete)"
        ),
        {
            "ok": report.ok,
            "size": report.size,
            "root": report.root,
            "checked": report.checked,
            "seq": report.first_bad_seq,
            "eid": report.first_bad_event_id,
            "reason": report.reason,
            "frontier": "[" + ",".join(f'"{base64.b64encode(h).decode()}"' for h in report.frontier) + "]",
            "complete": report.complete,
        },
    )


def latest_result(session: Session) -> Row[Any] | None:
    """The latest row, a check's whole verdict or the part of one a deadline stopped (where to resume)."""
    return session.execute(text("SELECT * FROM audit_verifications ORDER BY id DESC LIMIT 1")).first()


def latest_verdict(session: Session) -> Row[Any] | None:
    """The latest result of a check that reached the log's end (or failed): what auditors are told."""
    return session.execute(text("SELECT * FROM audit_verifications WHERE complete ORDER BY id DESC LIMIT 1")).first()


#: beside the witness file: where the next check resumes
SUFFIX = ".check"


def place_file(witness: Path) -> Path:
    return audit_places.beside(witness, SUFFIX)


def resume_point(session: Session, witness: Path | None = None) -> merkle.CompactRange | None:
    """Where the next check continues (None: from scratch): the last check's end when it passed (or
    the end of the part a deadline let it do). After a failure at a position, the last good size at
    or before that position, so that the next check walks over it again and finds it if it is still
    there, without walking the whole log again each minute; after any other failure (a stored
    checkpoint unsigned, the old chain, skipped events, a rewound log), from scratch.

    With a ``witness`` file, the place kept beside it (:func:`keep_place`), pulled back to the stored
    results' where those say less: a failure any process recorded (several worker pods each keep a
    file of their own, and the check runs on whichever takes it) is walked over again by every one,
    while a "good" row cannot move a place forward. A process with no file yet (a new pod) starts from
    the results' place, as without a witness file."""
    stored = _stored_place(session)
    if witness is None:
        return stored
    kept = audit_places.read(place_file(witness))
    if kept is None or stored is None or stored.size < kept.size:
        return stored
    return kept


def _stored_place(session: Session) -> merkle.CompactRange | None:
    """:func:`resume_point` from the stored results alone."""
    row = latest_result(session)
    if row is not None and not row.ok:
        if row.first_bad_seq is None:
            return None
        row = session.execute(
            text("SELECT * FROM audit_verifications WHERE ok AND id < :id AND size <= :seq ORDER BY id DESC LIMIT 1"),
            {"id": row.id, "seq": row.first_bad_seq},
        ).first()
    if row is None or not row.ok or row.root is None:
        return None
    compact = merkle.CompactRange(row.size, [base64.b64decode(h) for h in row.frontier])
    return compact if compact.root() == bytes(row.root) else None


def keep_place(witness: Path, report: LogReport, start: merkle.CompactRange | None) -> None:
    """Keep where the check after ``report`` resumes, beside the ``witness`` file (:func:`resume_point`):
    the end ``report`` reached when it passed; after a failure at a position, ``start`` (the place
    this check resumed from, as it was before the walk extended it) when it lies at or before that
    position, else nothing (from scratch)."""
    place: merkle.CompactRange | None = None
    if report.ok:  # (read back, a place counts only where a signed checkpoint has its root: trusted_start)
        place = merkle.CompactRange(report.size, list(report.frontier))
    elif report.first_bad_seq is not None and start is not None and start.size <= report.first_bad_seq:
        place = start
    audit_places.write(place_file(witness), place)


def extends(session: Session, old_size: int, old_root: bytes, new_size: int, new_root: bytes) -> bool:
    """Whether the stored tree proves (RFC 9162 consistency proof) that the tree of ``new_size`` and
    ``new_root`` extends the one of ``old_size`` and ``old_root``. A new history cannot be proven to."""
    if old_size >= new_size or old_size == 0:
        return old_size == 0 or (old_size == new_size and old_root == new_root)
    try:
        proof = audit_log.consistency_proof(session, old_size, new_size)
    except (LookupError, ValueError):
        return False  # the stored tree lacks what the proof needs
    return merkle.verify_consistency(old_size, new_size, proof, old_root, new_root)


def stored_roots(session: Session) -> Callable[[int], bytes | None]:
    """The stored tree's root at a size (None where it is smaller or lacks a node), as
    :func:`core.witness_scan.scan` asks for it; nodes read once are kept for the next sizes."""
    tree = audit_log.StoredTree(session)
    sizes: list[int] = []

    def root_at(at: int) -> bytes | None:
        if not sizes:  # read at the first call, after the caller read the witness file: each note
            sizes.append(audit_log.tree_size(session))  # there was committed before it was written
        if at > sizes[0]:
            return None
        try:
            return tree.root(at)
        except LookupError:
            return None

    return root_at


def trusted_start(session: Session, start: merkle.CompactRange, roots: RootStream, highest: Checkpoint | None) -> bool:
    """Whether a check may resume at ``start``: a signed checkpoint of its size vouches for its root
    (``roots``), and its tree extends ``highest``, the largest the witness file has held, when that
    one is not larger (a larger one is among the roots: the walk meets it)."""
    if start.root() not in (roots.get(start.size) or []):
        return False
    if highest is None or highest.size > start.size:
        return True
    return extends(session, highest.size, highest.root, start.size, start.root())
