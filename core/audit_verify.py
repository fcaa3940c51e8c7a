"""Verifying the audit log: recompute every leaf from the event rows and every root from the leaves.

Nothing stored in Postgres is trusted but the event rows themselves: leaf hashes are recomputed from
the events' content, roots from those leaves (a compact range, O(log n) memory), and the roots are
compared with *signed* checkpoints: the ones in ``audit_checkpoints`` and in the witness file whose
Ed25519 signature verifies, and a checkpoint an auditor pinned earlier (:func:`verify_against`).

What the report names:

* a sealed event whose row was deleted, or a position missing from the log: exactly that position;
* an event edited while its stored leaf hash was left alone: exactly that event;
* an edit or removal hidden by rewriting the stored hashes too: the range of events between the last
  signed checkpoint that still matches and the first that no longer does (the sealer signs one per
  run, about a second's worth of events), starting with its first event;
* an event the log skipped: committed before the last sealed event (in the sealer's (transaction,
  id) order) but without a position. The sealer never leaves one behind; a leaf inserted out of turn
  (the services' login may insert leaves) would, and the skipped events would stay unprotected.

A database login can rewrite rows and stored hashes, but not a checkpoint signed by a key it cannot
read, nor the witness file; so any change to an event already covered by a signed checkpoint fails.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from core import audit_log, audit_resume, merkle
from core.audit import LEAF_COLUMNS_SQL, leaf_bytes_from_columns
from core.audit_chain import verify_chain as verify_old_chain
from core.audit_roots import RootStream
from core.checkpoint import Checkpoint, Verifier, parse


@dataclass
class LogReport:
    ok: bool
    checked: int
    size: int
    root: bytes | None = None
    first_bad_seq: int | None = None
    first_bad_event_id: int | None = None
    reason: str | None = None
    checkpoints: int = 0
    frontier: list[bytes] = field(default_factory=list)
    #: with ``every``: (position, event id or None, reason) of every problem found, in order
    problems: list[tuple[int, int | None, str]] = field(default_factory=list)
    #: False when a deadline stopped the walk before the log's end, at a size a signed checkpoint
    #: vouches for: ``size`` events are verified, and the next check resumes there
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "size": self.size,
            "root": base64.b64encode(self.root).decode() if self.root is not None else None,
            "first_bad_seq": self.first_bad_seq,
            "first_bad_event_id": self.first_bad_event_id,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "problems": [{"position": p, "event_id": e, "reason": r} for p, e, r in self.problems],
            "complete": self.complete,
        }


_LEAF_SQL = f"""
    SELECT l.seq, l.event_id, l.leaf_hash, {LEAF_COLUMNS_SQL}
    FROM audit_leaves l LEFT JOIN audit_events e ON e.id = l.event_id
    WHERE l.seq >= %s ORDER BY l.seq
"""  # noqa: S608 - a constant column list, the position is bound


def _rows(session: Session, start: int, batch: int) -> Iterator[tuple[int, int, bytes, int | None, bytes]]:
    """(position, event id, stored leaf hash, the event row's id or None, recomputed leaf hash) in order."""
    raw = session.connection().connection.dbapi_connection
    assert raw is not None
    cursor: Any = raw.cursor(name=f"audit_verify_{id(session)}")  # a psycopg2 named (server-side) cursor
    cursor.itersize = batch
    leaf_hash = merkle.leaf_hash
    try:
        cursor.execute(_LEAF_SQL, (start,))
        for row in cursor:
            if row[3] is None:
                yield row[0], row[1], bytes(row[2]), None, b""
                continue
            yield row[0], row[1], bytes(row[2]), row[3], leaf_hash(leaf_bytes_from_columns(row[3:]))
    finally:
        cursor.close()


def walk(
    session: Session,
    roots: RootStream,
    *,
    start: merkle.CompactRange | None = None,
    require_size: int = 0,
    batch: int = 5000,
    every: bool = False,
    deadline: float | None = None,
    until: int | None = None,
) -> LogReport:
    """Recompute the log from position ``start.size`` on and compare with ``roots`` at each size
    (a :class:`~core.audit_roots.RootStream` reads them as the walk reaches them).

    With ``deadline`` (a ``time.monotonic()`` reading), a walk that passes it stops at the next size
    whose signed checkpoint it matched, with an incomplete report: a check resumed from there later
    is vouched for by that checkpoint (:func:`verify_log`). With ``until`` (the size of a signed
    checkpoint short of the log's end), it stops there the same way.

    Stops at the first problem, or with ``every`` goes on past it and lists them all: an edited or
    removed event row is reported and its stored leaf stands in for it, so later checkpoints can
    still be matched; after a missing position or a checkpoint that no longer matches, the roots
    cannot be, and only the rows are still checked against their leaves.
    """
    compact = start or merkle.CompactRange()
    checked = matched = 0
    next_seq, tree_ok = compact.size, True
    range_start: tuple[int, int] | None = None  # first event since the last matching checkpoint
    problems: list[tuple[int, int | None, str]] = []

    def report() -> LogReport:
        seq, event_id, reason = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        out = LogReport(False, checked, compact.size, None, seq, event_id, reason + more, matched)
        out.problems = problems
        return out

    for position, event_id, stored, present, leaf in _rows(session, compact.size, batch):
        if position != next_seq:
            problems.extend(
                (p, None, f"position {p} is missing from the log (its leaf was removed)")
                for p in range(next_seq, position)
            )
            tree_ok = False
            if not every:
                return report()
        seq, next_seq = position, position + 1
        if present is None:
            problems.append((seq, event_id, f"event {event_id} at position {seq} was removed"))
        elif leaf != stored:
            problems.append(
                (seq, event_id, f"event {event_id} at position {seq} was altered (no longer matches its leaf)")
            )
        if problems and not every:
            return report()
        checked += 1
        if not tree_ok:
            continue
        if range_start is None:
            range_start = (seq, event_id)
        compact.append(stored)  # == the recomputed leaf unless reported above
        expected = roots.get(compact.size)
        if expected:
            if any(r != compact.root() for r in expected):
                first_seq, first_id = range_start
                problems.append(
                    (
                        first_seq,
                        first_id,
                        f"events at positions {first_seq}..{compact.size - 1} (from event {first_id}) no longer match "
                        f"the signed checkpoint of size {compact.size}: one was removed, altered or reordered "
                        "and the stored hashes rewritten",
                    )
                )
                tree_ok = False
                if not every:
                    return report()
            else:
                matched += 1
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not problems and (out_of_time or (until is not None and compact.size >= until)):
                    partial = LogReport(True, checked, compact.size, compact.root(), checkpoints=matched)
                    partial.frontier, partial.complete = list(compact.hashes), False
                    return partial
            range_start = None
    end = max(require_size, roots.highest())
    if next_seq < end:
        problems.append((next_seq, None, f"the log ends at {next_seq} events; a signed checkpoint has {end}"))
    if problems:
        return report()
    return LogReport(True, checked, compact.size, compact.root(), checkpoints=matched, frontier=list(compact.hashes))


_LEAF_EVENT = "SELECT e.txid::text AS txid, e.id FROM audit_leaves l JOIN audit_events e ON e.id = l.event_id"
#: events a look for skipped ones reads in one statement. One statement over the whole log (``dermq audit
#: verify``) hash-joined every event with every leaf: about a second a million events on a 2-core host,
#: so a log of some fifteen million ended the walk of all of it in the statement timeout, with a
#: traceback and no verdict. Each slice is read from the (transaction, id) index, and its events are
#: looked up one by one in the leaves' unique index: its cost is the slice's, whatever the log's size.
SKIPPED_SLICE = 50_000
_SLICE_END = text(
    """
    SELECT e.txid::text AS txid, e.id FROM audit_events e
    WHERE (e.txid, e.id) > (CAST(:txid AS xid8), :id)
    ORDER BY e.txid, e.id OFFSET :offset LIMIT 1
    """
)
# OFFSET 0 keeps the NOT EXISTS a lookup per event: as an anti-join it read every leaf for each slice
_SKIPPED = text(
    """
    SELECT e.id FROM audit_events e
    WHERE (e.txid, e.id) > (CAST(:low_txid AS xid8), :low_id)
      AND (e.txid, e.id) <= (CAST(:to_txid AS xid8), :to_id)
      AND (e.txid, e.id) < (CAST(:high_txid AS xid8), :high_id)
      AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
      AND NOT EXISTS (SELECT 1 FROM audit_leaves l WHERE l.event_id = e.id AND l.seq >= 0 OFFSET 0)
    ORDER BY e.txid, e.id
    LIMIT :limit
    """
)


def skipped_events(session: Session, limit: int = 100, *, after: int = 0, upto: int | None = None) -> list[int]:
    """Ids of committed events older than the last sealed one that have no position in the log (the
    first ``limit``): no leaf, or one at a negative position, outside the log, where only an owner who
    dropped migration 0029's constraint can put one. With ``after``, only those younger than the event
    at position ``after - 1``: what was sealed since a check that verified ``after`` positions (an
    index range, not the whole table). With ``upto``, only those older than the event at position
    ``upto - 1`` (what a check that stopped there walked past; the next check looks further). Read a
    slice of :data:`SKIPPED_SLICE` events a statement."""
    if upto is not None:
        high = session.execute(text(f"{_LEAF_EVENT} WHERE l.seq = :seq"), {"seq": upto - 1}).first()
    else:
        high = session.execute(text(f"{_LEAF_EVENT} ORDER BY l.seq DESC LIMIT 1")).first()
    if high is None:
        return []
    low = session.execute(text(f"{_LEAF_EVENT} WHERE l.seq = :seq"), {"seq": after - 1}).first() if after else None
    place = (low.txid, low.id) if low else ("0", 0)
    found: list[int] = []
    while len(found) < limit:
        end = session.execute(_SLICE_END, {"txid": place[0], "id": place[1], "offset": SKIPPED_SLICE - 1}).first()
        to = (high.txid, high.id)
        last = end is None or (int(end.txid), end.id) >= (int(high.txid), high.id)
        if end is not None and not last:
            to = (end.txid, end.id)
        bounds = {
            "low_txid": place[0],
            "low_id": place[1],
            "to_txid": to[0],
            "to_id": to[1],
            "high_txid": high.txid,
            "high_id": high.id,
            "limit": limit - len(found),
        }
        found.extend(session.scalars(_SKIPPED, bounds))
        if last:
            break
        place = to
    return found


def _with_skipped(session: Session, report: LogReport, *, after: int = 0) -> LogReport:
    """``report`` with the events the log skipped (:func:`skipped_events`) added as problems: among
    those the walk went past, when it stopped short of the log's end."""
    skipped = skipped_events(session, after=after, upto=None if report.complete else report.size)
    if not skipped:
        return report
    found: list[tuple[int, int | None, str]] = [
        (report.size, event_id, f"event {event_id} was skipped by the log: it has no position") for event_id in skipped
    ]
    report.problems = [*report.problems, *found]
    if report.ok:
        report.ok, report.first_bad_seq, report.first_bad_event_id = False, None, skipped[0]
        report.reason = found[0][2] + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
    return report


def verify_log(
    session: Session,
    *,
    verifiers: Sequence[Verifier] | None,
    witness: Path | None = None,
    start: merkle.CompactRange | None = None,
    every: bool = False,
    deadline: float | None = None,
    highest: Checkpoint | None = None,
    window: int | None = None,
    whole: bool = True,
) -> LogReport:
    """The whole log (or from a verified ``start``) against every trusted checkpoint; also the old chain.
    With ``deadline``, it may stop short of the log's end (:func:`walk`; the report says it is not
    complete). ``highest``: the largest checkpoint the witness file has held (:mod:`core.witness_scan`),
    signature checked; a resume point must extend it, and the walk meets it if it is larger. With
    ``window``, a check far behind the log's end (catching up) stops at the last signed checkpoint
    within that many events past its start. The checkpoints are read as the walk reaches them
    (:class:`~core.audit_roots.RootStream`): memory does not grow with the log or the window.

    With ``verifiers=None`` the stored checkpoints are taken as they are (no signature check): a
    self-consistency check for tests and the worker's quick check, not proof against an insider.
    With ``whole=False``, the events against the checkpoints only: not the old chain of the rows from
    before the log (each is in the log too), nor the events the log skipped (the re-walk's slices,
    :mod:`core.audit_rewalk`, which the incremental check's own looks cover).
    """
    until = _window_end(session, start.size if start else 0, window)
    roots = RootStream(session, verifiers, witness, since=start.size if start else 0, until=until)
    trusted = start is None or verifiers is None or audit_resume.trusted_start(session, start, roots, highest)
    if not trusted:
        start = None  # the whole log is checked again
        until = _window_end(session, 0, window)
        roots = RootStream(session, verifiers, witness, until=until)
    if highest is not None and highest.size > (start.size if start else 0):
        roots.add(highest.size, highest.root)
    if start is None and whole:
        old = verify_old_chain(session)
        if not old.ok:
            return LogReport(False, 0, 0, None, None, old.first_bad_id, f"pre-log chain: {old.reason}")
    after = start.size if start is not None else 0  # before the walk: it extends ``start`` in place
    report = walk(session, roots, start=start, every=every, deadline=deadline, until=until)
    if report.ok and roots.problem:
        report.ok, report.reason = False, roots.problem
    if whole:
        report = _with_skipped(session, report, after=after)
    if not report.ok:  # a failure is a verdict, wherever a deadline stopped the walk
        report.complete = True
    return report


def _window_end(session: Session, since: int, window: int | None) -> int | None:
    """The size of the last stored checkpoint within ``window`` events past ``since``, when the log goes
    on beyond it; None: no window (the check may walk to the log's end)."""
    if window is None:
        return None
    end = session.scalar(
        text("SELECT max(size) FROM audit_checkpoints WHERE size > :since AND size <= :limit"),
        {"since": since, "limit": since + window},
    )
    return int(end) if end is not None and end < audit_log.tree_size(session) else None


def verify_against(
    session: Session,
    note: str,
    verifiers: Sequence[Verifier],
    *,
    witness: Path | None = None,
    every: bool = False,
) -> tuple[Checkpoint, LogReport]:
    """Prove that the log still extends the checkpoint ``note`` (pinned earlier by an auditor).

    Raises :class:`CheckpointError` when the note's signature does not verify. The report is not ok,
    and names the first missing or altered event, when the log no longer hashes to the pinned root or
    to any other signed checkpoint.
    """
    pinned = parse(note, list(verifiers))
    roots = RootStream(session, verifiers, witness)
    roots.add(pinned.size, pinned.root)
    report = _with_skipped(session, walk(session, roots, require_size=pinned.size, every=every))
    if report.ok and roots.problem:  # a stored checkpoint unsigned or unlike its note: as `verify` says too
        report.ok, report.reason = False, roots.problem
    return pinned, report
