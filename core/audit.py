"""The tamper-evident audit trail: append-only rows chained by SHA-256.

Each row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical content (sorted
JSON of every field, ``id`` included). Writers take a transaction-scoped advisory lock before they
read the chain head, so concurrent transactions append one after another and the chain cannot
fork; the lock is held until commit, which is why services record their audit event last. The
database refuses UPDATE, DELETE and TRUNCATE on the table (a trigger, see the migrations), so an
edit needs a superuser who disables the trigger, and :func:`verify_chain` then names the first row
whose hash or link no longer matches.

Fields follow FHIR AuditEvent (when, action, outcome, agent, source, entity). Never image bytes,
client references or secrets: ``detail`` carries ids, codes and counts only.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core.models import AuditEvent

GENESIS = "0" * 64
#: pg_advisory_xact_lock key that serialises appends to the chain ("dermq" in ASCII).
CHAIN_LOCK = 0x6465726D71

SUCCESS, FAILURE, DENIED = "success", "failure", "denied"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it, from where (FHIR AuditEvent.agent + source)."""

    type: str = "system"  # api_key | anonymous | system | cli
    key_id: uuid.UUID | None = None
    role: str | None = None
    clinic_id: uuid.UUID | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None

    def with_key(self, key_id: uuid.UUID, role: str, clinic_id: uuid.UUID | None) -> Actor:
        return Actor("api_key", key_id, role, clinic_id, self.source_ip, self.user_agent, self.request_id)


SYSTEM = Actor("system")


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An audit event to write in a transaction of its own (denials: the request's own rolls back)."""

    action: str
    outcome: str
    entity_type: str | None = None
    entity_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _content(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "occurred_at": event.occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "action": event.action,
        "outcome": event.outcome,
        "actor_type": event.actor_type,
        "actor_key_id": str(event.actor_key_id) if event.actor_key_id else None,
        "actor_role": event.actor_role,
        "clinic_id": str(event.clinic_id) if event.clinic_id else None,
        "source_ip": event.source_ip,
        "user_agent": event.user_agent,
        "request_id": event.request_id,
        "entity_type": event.entity_type,
        "entity_id": event.entity_id,
        "detail": event.detail or {},
    }


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical(_content(event))}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Event:
    """One event for :func:`record_many`: what :func:`record` takes as arguments."""

    action: str
    outcome: str
    actor: Actor
    entity_type: str | None = None
    entity_id: str | uuid.UUID | None = None
    clinic_id: uuid.UUID | None = None
    detail: dict[str, Any] | None = None


def record(
    session: Session,
    *,
    action: str,
    outcome: str,
    actor: Actor,
    entity_type: str | None = None,
    entity_id: str | uuid.UUID | None = None,
    clinic_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain inside ``session``'s transaction (flushed, not committed).

    Waits for the chain at most the connection's ``lock_timeout`` (``DERMQ_DATABASE_LOCK_TIMEOUT_MS``):
    if the trail cannot be written promptly the caller's whole transaction fails, and the API
    answers 503 without returning any data ("no audit, no access").
    """
    return record_many(session, [Event(action, outcome, actor, entity_type, entity_id, clinic_id, detail)])[0]


def record_many(session: Session, events: Sequence[Event]) -> list[AuditEvent]:
    """Append ``events`` to the chain, in order, inside ``session``'s transaction (flushed, not committed).

    One lock, one read of the head with all the new ids, and one multi-row INSERT however many events
    there are: a worker that finishes a batch of cases audits them in three round trips, not 3 per case.
    """
    if not events:
        return []
    session.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK)))
    # One round trip for the chain's head and the new ids, while the lock is held. A separate statement
    # from the lock's: its snapshot must be taken after the lock was granted, so it sees the head that
    # the previous holder committed.
    last, new_ids = session.execute(
        select(
            select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1).scalar_subquery(),
            text("array(SELECT nextval(pg_get_serial_sequence('audit_events', 'id')) FROM generate_series(1, :n))"),
        ),
        {"n": len(events)},
    ).one()
    prev_hash = last or GENESIS
    written = []
    for new_id, e in zip(sorted(new_ids), events, strict=True):
        actor = e.actor
        event = AuditEvent(
            id=new_id,
            occurred_at=datetime.now(UTC),
            action=e.action,
            outcome=e.outcome,
            actor_type=actor.type,
            actor_key_id=actor.key_id,
            actor_role=actor.role,
            clinic_id=e.clinic_id if e.clinic_id is not None else actor.clinic_id,
            source_ip=actor.source_ip,
            user_agent=(actor.user_agent or "")[:256] or None,
            request_id=actor.request_id,
            entity_type=e.entity_type,
            entity_id=str(e.entity_id) if e.entity_id is not None else None,
            detail=e.detail or {},
            prev_hash=prev_hash,
        )
        event.hash = prev_hash = chain_hash(prev_hash, event)
        written.append(event)
    session.add_all(written)
    session.flush()
    return written


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str | None = None
    last_hash: str | None = None
    last_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_id": self.first_bad_id,
            "reason": self.reason,
            "last_hash": self.last_hash,
        }


def _rows(session: Session, batch: int, after_id: int = 0) -> Iterator[AuditEvent]:
    last_id = after_id
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()


def verify_chain(session: Session, *, batch: int = 2000, start_after: tuple[int, str] | None = None) -> ChainReport:
    """Walk the chain in id order and report the first row whose link or hash is wrong.

    ``start_after=(id, hash)`` continues from a row verified earlier (the periodic check), so only
    rows appended since are read; without it the whole chain is walked from the first row.
    """
    after_id, expected_prev = start_after if start_after is not None else (0, GENESIS)
    checked, last_id = 0, None
    for event in _rows(session, batch, after_id):
        if event.prev_hash != expected_prev:
            return ChainReport(
                False,
                checked,
                event.id,
                "prev_hash does not match the previous row's hash (a row was removed, inserted or reordered)",
            )
        if chain_hash(expected_prev, event) != event.hash:
            return ChainReport(False, checked, event.id, "content does not match its hash (the row was altered)")
        expected_prev, last_id = event.hash, event.id
        checked += 1
    return ChainReport(True, checked, last_hash=expected_prev if checked else None, last_id=last_id)


# --------------------------------------------------------------------------- queries (auditors)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None
    actor_key_id: uuid.UUID | None = None
    clinic_id: uuid.UUID | None = None
    case_id: uuid.UUID | None = None
    action: str | None = None
    outcome: str | None = None

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.since is not None:
            clauses.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            clauses.append(AuditEvent.occurred_at < self.until)
        if self.actor_key_id is not None:
            clauses.append(AuditEvent.actor_key_id == self.actor_key_id)
        if self.clinic_id is not None:
            clauses.append(AuditEvent.clinic_id == self.clinic_id)
        if self.case_id is not None:
            clauses.append(AuditEvent.entity_type == "case")
            clauses.append(AuditEvent.entity_id == str(self.case_id))
        if self.action is not None:
            clauses.append(AuditEvent.action == self.action)
        if self.outcome is not None:
            clauses.append(AuditEvent.outcome == self.outcome)
        return clauses

    def describe(self) -> dict[str, str]:
        """The filter as plain strings, for the audit record of the query itself."""
        return {
            k: (v.isoformat() if isinstance(v, datetime) else str(v))
            for k, v in ((f, getattr(self, f)) for f in self.__slots__)
            if v is not None
        }


def search(
    session: Session, filters: AuditFilter, *, before_id: int | None, limit: int
) -> tuple[list[AuditEvent], int | None]:
    """Newest first; returns (page, the id to pass as ``before_id`` for the next page, or None)."""
    query = select(AuditEvent).where(*filters.where())
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    rows = list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit and page else None)


def stream(session: Session, filters: AuditFilter, *, batch: int = 1000) -> Iterator[AuditEvent]:
    """Every matching event, newest first, read in batches through a server-side cursor."""
    query = (
        select(AuditEvent)
        .where(*filters.where())
        .order_by(AuditEvent.id.desc())
        .execution_options(stream_results=True, yield_per=batch)
    )
    yield from session.scalars(query)


EXPORT_FIELDS = (
    "id",
    "occurred_at",
    "action",
    "outcome",
    "actor_type",
    "actor_key_id",
    "actor_role",
    "clinic_id",
    "source_ip",
    "user_agent",
    "request_id",
    "entity_type",
    "entity_id",
    "detail",
    "prev_hash",
    "hash",
)


def as_record(event: AuditEvent) -> dict[str, Any]:
    content = _content(event)
    return {**content, "prev_hash": event.prev_hash, "hash": event.hash}
