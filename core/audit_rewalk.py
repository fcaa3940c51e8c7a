"""The audit log walked again, a slice at each periodic check: events the check passed are recomputed.

The periodic check (:func:`worker.sealing.check`) is incremental: it recomputes each event once,
when the event is new. The tables' owner could edit an event it has passed and keep the event's
stored leaf hash (and so every stored node and checkpoint): the incremental check would not see it,
only ``dermq audit verify`` would. The re-walk closes that gap. After a check that reached the log's
end and passed, it walks on from where the last re-walk stopped for ``DERMQ_AUDIT_REWALK_SECONDS``
(3 s a minute: 5% of a core; at about 26,000 events a second, ``bench.audit_verify``'s walk with a
checkpoint each 5 events on a 2-core host, a slice covers about 80,000 events, and a year's log of
100 million events is walked again about every 21 hours), recomputing each event's leaf from its row and the roots from
those leaves, against the stored signed checkpoints (:func:`core.audit_verify.verify_log`; the
witness file's end, all a check reads of it, is for the incremental part). At the log's end it
starts again from the beginning.

Its place (tree size and compact range, :class:`core.merkle.CompactRange`) is kept beside the witness
file, ``<witness>.rewalk``, where the database's logins cannot write; without a witness file there is
no re-walk. A place whose root no signed checkpoint has (a file edited, or from another log) is not
trusted: the walk starts from the beginning (:func:`core.audit_resume.trusted_start`). A file that
cannot be read or written restarts the cycle or leaves it where it was: it never fails the check.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from core import audit_places, audit_verify, merkle
from core.checkpoint import Checkpoint, Verifier

SUFFIX = ".rewalk"


def place_file(witness: Path) -> Path:
    """Where the re-walk keeps its place: beside the witness file."""
    return audit_places.beside(witness, SUFFIX)


def read_place(witness: Path) -> merkle.CompactRange | None:
    """The compact range the last re-walk stopped at (None: start from the beginning)."""
    return audit_places.read(place_file(witness))


def write_place(witness: Path, place: merkle.CompactRange | None) -> None:
    """Keep ``place`` for the next re-walk (None: the next starts from the beginning)."""
    audit_places.write(place_file(witness), place)


def step(
    session: Session,
    verifiers: Sequence[Verifier],
    witness: Path,
    *,
    seconds: float,
    highest: Checkpoint | None = None,
    window: int | None = None,
) -> audit_verify.LogReport:
    """Walk the log for about ``seconds`` from the kept place, against the stored signed checkpoints; keep
    the place it stopped at (a signed checkpoint's size), or none once it reached the log's end. A
    report that is not ok names what it found, as the incremental check's would."""
    report = audit_verify.verify_log(  # against the stored signed checkpoints: the witness file's end,
        session,  # all a check reads of it, is the incremental check's part
        verifiers=verifiers,
        witness=None,
        start=read_place(witness),
        deadline=time.monotonic() + seconds,
        highest=highest,
        window=window,
        whole=False,
    )
    if report.ok:
        write_place(witness, None if report.complete else merkle.CompactRange(report.size, report.frontier))
    return report
