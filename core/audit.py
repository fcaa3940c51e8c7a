"""The audit trail: append-only event rows, written lock-free, sealed into a signed Merkle log.

An audited transaction inserts its events like any other row, in the same transaction as the access
("no audit, no access"), and takes no global lock: concurrent requests never wait for each other
here. A single sealer (:mod:`core.audit_log`) later sequences the committed events into an RFC 9162
Merkle tree and signs checkpoints with a key that lives outside the database; a checkpoint pinned by
an auditor, or kept in the witness file, proves every event it covers. The database refuses UPDATE,
DELETE and TRUNCATE on the table (a trigger, see the migrations), and the runtime login holds only
INSERT and SELECT on it.

Each event's leaf is the canonical JSON of its content (:func:`leaf_bytes`, ``id`` included). Rows
written before the Merkle log also carry the old hash chain (``prev_hash``/``hash``), still checkable
with :func:`core.audit_chain.verify_chain`.

Fields follow FHIR AuditEvent (when, action, outcome, agent, source, entity). Never image bytes,
client references or secrets: ``detail`` carries ids, codes and counts only.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, and_, insert, or_, select
from sqlalchemy.orm import Session, aliased

from core import audit_ranges
from core.models import AuditEvent

SUCCESS, FAILURE, DENIED = "success", "failure", "denied"

#: Every action dermq records, and what it means (docs/API.md lists them; auditor filters accept only these).
ACTIONS: dict[str, str] = {
    "auth.denied": "a request with a missing, malformed, unknown or revoked API key",
    "access.denied": "a valid key used for a route its role may not use",
    "case.create": "a clinic submitted an image (a new case); a denied one reused an Idempotency-Key",
    "case.replay": "a clinic resubmitted with an Idempotency-Key and got its existing case back",
    "case.read": "a clinic read a case and its result",
    "case.list": "a clinic listed its cases",
    "heatmap.read": "a clinic fetched a case's Grad-CAM heat map",
    "case.delete": "a clinic erased a case's image, heat map, client reference, result and outcome (or was refused)",
    "case.outcome": "a clinic reported a case's confirmed diagnosis (a correction replaces it; detail: method, "
    "revision, correction; never the diagnosis)",
    "case.start": "a worker claimed a case (failure: a claim that met a database error on every retry, "
    "its attempt spent)",
    "case.classify": "a worker stored a case's result",
    "case.fail": "a case failed (its code says why)",
    "case.requeue": "the sweeper put a stuck case back in the queue",
    "case.purge": "retention or a period key's destruction crypto-shredded a case's patient data",
    "callback.register": "a clinic set its completion callback (detail: the URL's scheme and host; on a rotation, "
    "until when the secrets it replaced still sign, or why they do not)",
    "callback.end_overlap": "a clinic stopped the secrets its callback's rotations replaced from signing",
    "callback.unregister": "a clinic removed its completion callback",
    "callback.read": "a clinic read its callback settings",
    "callback.deliver": "dermq delivered (or gave up, or cancelled) a completion callback (detail: the attempt, "
    "the receiver's host and its answer; a cancellation's reason: callback_removed, clinic_inactive, case_erased)",
    "drift.read": "the drift check (hourly, or an operator's dermq drift report) opened the labels of a window's "
    "cases to compare the label mix with the model's validation data (detail: how many)",
    "clinic.create": "an admin or operator created a clinic",
    "clinic.activate": "a clinic was reactivated",
    "clinic.deactivate": "a clinic was deactivated (its keys stop working)",
    "key.create": "an API key was issued",
    "key.list": "an admin listed API keys",
    "key.revoke": "an API key was revoked",
    "keys.rotate": "an operator rotated the encryption keys",
    "keys.rewrap": "data keys were re-wrapped under the active key",
    "keys.retire": "an old encryption key was removed from the key file",
    "keys.destroy_period": "a period's key was destroyed (retention or an operator), or its destruction refused: "
    "no blob of that period's cases can be decrypted again, in the database or in a backup",
    "audit.query": "an auditor searched the audit trail",
    "audit.export": "an auditor exported a time range",
    "audit.verify": "an auditor read the latest verification of the log",
    "audit.checkpoint": "an auditor fetched the latest signed checkpoint",
    "audit.proof": "an auditor fetched an inclusion or consistency proof",
}


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


def cli_actor() -> Actor:
    """The actor of an operator's ``dermq`` command: the OS user and host, kept in ``user_agent``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return Actor("cli", user_agent=f"dermq-cli {user}@{socket.gethostname()}"[:256])


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An audit event to write in a transaction of its own (denials: the request's own rolls back)."""

    action: str
    outcome: str
    entity_type: str | None = None
    entity_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    #: a clinic whose auditors must see it too (the owner of a case another clinic probed)
    also_clinic_id: uuid.UUID | None = None


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


def leaf_bytes(event: AuditEvent) -> bytes:
    """The event's Merkle leaf: its canonical content as UTF-8."""
    return canonical(_content(event)).encode()


#: The columns of :func:`_content` for an ``audit_events`` row aliased ``e``, rendered by Postgres as
#: text exactly as :func:`_content` renders them (UUIDs lower-case with hyphens, UTC ISO 8601 with
#: microseconds, ``detail`` as JSON): the sealer and the verifier read thousands of rows a second
#: this way, without building ORM objects (tests check both paths give the same leaf). ``to_char``
#: prints a year BC without its sign, so a time moved back to the same date BC is marked (Python
#: cannot hold such a time: no genuine event has one), or its leaf would not change.
LEAF_COLUMNS_SQL = """e.id,
    to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
        || CASE WHEN e.occurred_at < '0001-01-01 00:00:00+00' THEN ' BC' ELSE '' END || '+00:00',
    e.action, e.outcome, e.actor_type, e.actor_key_id::text, e.actor_role, e.clinic_id::text,
    e.source_ip, e.user_agent, e.request_id, e.entity_type, e.entity_id, coalesce(e.detail, '{}')::text"""
_LEAF_FIELDS = (
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
)


def leaf_bytes_from_columns(columns: Sequence[Any]) -> bytes:
    """The leaf of a row read with :data:`LEAF_COLUMNS_SQL` (14 values, ``detail`` last, as JSON text)."""
    content = dict(zip(_LEAF_FIELDS, columns[:13], strict=True))
    content["detail"] = json.loads(columns[13])
    return canonical(content).encode()


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
) -> int:
    """Insert one event inside ``session``'s transaction (not committed); returns its id.

    No global lock: the row is an ordinary insert. If it cannot be written (a lock held on the table,
    a failed database) the caller's whole transaction fails, and the API answers 503 without returning
    any data ("no audit, no access").
    """
    return record_many(session, [Event(action, outcome, actor, entity_type, entity_id, clinic_id, detail)])[0]


def record_many(session: Session, events: Sequence[Event]) -> list[int]:
    """Insert ``events``, in order, inside ``session``'s transaction (not committed): one multi-row
    INSERT however many events there are, through SQLAlchemy Core rather than the ORM's unit of work
    (which took about a tenth of the API's CPU per case). Returns their ids, in order. The sealer
    later gives them their log positions."""
    if not events:
        return []
    rows = []
    for e in events:  # each event's time is the database's clock at its insert (its insert guard sets it)
        actor = e.actor
        rows.append(
            {
                "action": e.action,
                "outcome": e.outcome,
                "actor_type": actor.type,
                "actor_key_id": actor.key_id,
                "actor_role": actor.role,
                "clinic_id": e.clinic_id if e.clinic_id is not None else actor.clinic_id,
                "source_ip": actor.source_ip,
                "user_agent": (actor.user_agent or "")[:256] or None,
                "request_id": actor.request_id,
                "entity_type": e.entity_type,
                "entity_id": str(e.entity_id) if e.entity_id is not None else None,
                "detail": e.detail or {},
            }
        )
    return list(session.scalars(_INSERT_EVENTS, rows))


_EVENTS = cast(Table, AuditEvent.__table__)
_INSERT_EVENTS = insert(_EVENTS).returning(_EVENTS.c.id, sort_by_parameter_order=True)


def verify_chain(session: Session) -> Any:
    """Check the stored log: every sealed event against its leaf and every checkpoint's root, and the
    old hash chain of the rows written before the log (signatures are checked by
    :func:`core.audit_verify.verify_log` with the verifier keys). Returns a report with ``ok``."""
    from core import audit_verify

    return audit_verify.verify_log(session, verifiers=None)


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
        """Every filter but the actor (:meth:`alternatives`), all of which an event must match."""
        clauses: list[Any] = []
        if self.since is not None:
            clauses.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            clauses.append(AuditEvent.occurred_at < self.until)
        if self.clinic_id is not None:
            clauses.append(AuditEvent.clinic_id == self.clinic_id)
        if self.case_id is not None:  # the case's own events, and the list views that showed it
            case = str(self.case_id)
            clauses.append(
                or_(
                    and_(AuditEvent.entity_type == "case", AuditEvent.entity_id == case),
                    and_(AuditEvent.action == "case.list", AuditEvent.detail.contains({"ids": [case]})),
                )
            )
        if self.action is not None:
            clauses.append(AuditEvent.action == self.action)
        if self.outcome is not None:
            clauses.append(AuditEvent.outcome == self.outcome)
        return clauses

    def alternatives(self) -> list[list[Any]]:
        """The ways an event may match besides :meth:`where`, each read on its own (from its own index,
        newest first: an ``OR`` of them would read every event of a busy key to sort them): for an
        actor, what the key did, and the requests refused that presented it (revoked, a wrong secret,
        its clinic deactivated: no actor, the key named as the entity)."""
        if self.actor_key_id is None:
            return [[]]
        key = self.actor_key_id
        refused = [AuditEvent.action == "auth.denied", AuditEvent.entity_type == "api_key"]
        return [[AuditEvent.actor_key_id == key], [*refused, AuditEvent.entity_id == str(key)]]

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
    """Newest first; returns (page, the id to pass as ``before_id`` for the next page, or None). A
    narrow time range is read whole, then sorted (:mod:`core.audit_ranges`)."""
    found: dict[int, AuditEvent] = {}
    whole = audit_ranges.read_whole(session, filters.since, filters.until, before_id)
    for alternative in filters.alternatives():
        query = select(AuditEvent).where(*filters.where(), *alternative)
        if before_id is not None:
            query = query.where(AuditEvent.id < before_id)
        event = AuditEvent
        if whole:  # OFFSET 0: planned without the page's LIMIT, so not by walking the ids backwards
            event = aliased(AuditEvent, query.offset(0).subquery())
            query = select(event)
        found.update((e.id, e) for e in session.scalars(query.order_by(event.id.desc()).limit(limit + 1)))
    rows = sorted(found.values(), key=lambda e: e.id, reverse=True)[: limit + 1]
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit and page else None)


def export_pages(
    open_session: Callable[[], AbstractContextManager[Session]], filters: AuditFilter, *, batch: int = 1000
) -> Iterator[list[dict[str, Any]]]:
    """Every matching event as export records, newest first, one page per short transaction.

    Each page is read (keyset, ``id < last``) and its transaction ended before the page is handed
    on, so a client that reads slowly never holds a transaction, or its snapshot, open.
    """
    before: int | None = None
    while True:
        with open_session() as session:
            page, before = search(session, filters, before_id=before, limit=batch)
            records = [as_record(e) for e in page]
        if records:
            yield records
        if before is None:
            return


EXPORT_FIELDS = (*_LEAF_FIELDS, "detail", "prev_hash", "hash")


def as_record(event: AuditEvent) -> dict[str, Any]:
    content = _content(event)
    return {**content, "prev_hash": event.prev_hash, "hash": event.hash}
