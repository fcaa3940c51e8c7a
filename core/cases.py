"""Case services shared by the API (submit, read, list, heat map) and the worker (claim, complete, fail).

Every function takes a keyword-only ``session`` and only flushes; the caller's scope commits. Every
access to patient data and every state change records an audit event, last, inside the same
transaction (see :mod:`core.audit` for why last). Denials raise an error that carries a
:class:`core.audit.PendingEvent`, which the API writes in a transaction of its own.

State machine: ``queued -> running -> succeeded | failed``, ``running -> queued`` (recovery), and
any terminal or queued state ``-> purged`` once the images are crypto-shredded. Worker transitions
are fenced by the attempt number, so a stale worker can never overwrite a newer run's outcome.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, String, Uuid, and_, column, delete, exists, or_, select, union_all, update, values
from sqlalchemy import case as sa_case
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate
from sqlalchemy.sql.elements import ColumnElement

from core import audit, pgbinary
from core.crypto import Keyring, SealedBlob, decrypt_blob, encrypt_blob
from core.errors import BadRequest, Conflict, DermqError, Forbidden, Gone, NotFound
from core.keys import Principal
from core.models import BlobKind, Case, CaseBlob, CaseStatus, Outcome, Priority, Result, Role


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class NewImage:
    """A validated upload: the bytes as sent plus what decoding learned about them."""

    data: bytes
    format: str
    media_type: str
    width: int
    height: int
    sha256: str


# --------------------------------------------------------------------------- access control


def _require_clinic(principal: Principal, action: str, entity_id: str | None = None) -> uuid.UUID:
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        raise Forbidden(
            f"a {principal.role.value} key cannot do this; use a clinic key",
            code="role_not_allowed",
            audit=audit.PendingEvent(
                action, audit.DENIED, "case", entity_id, {"reason": "role", "role": principal.role.value}
            ),
        )
    return principal.clinic_id


def _not_found(action: str, case_id: uuid.UUID | str, reason: str) -> NotFound:
    return NotFound(
        "no such case for this clinic",
        code="case_not_found",
        audit=audit.PendingEvent(action, audit.DENIED, "case", str(case_id), {"reason": reason}),
    )


def owned_case(
    session: Session, principal: Principal, case_id: uuid.UUID, action: str, *, for_update: bool = False
) -> Case:
    clinic_id = _require_clinic(principal, action, str(case_id))
    case = session.get(Case, case_id, with_for_update=for_update)
    if case is None:
        raise _not_found(action, case_id, "unknown_case")
    if case.clinic_id != clinic_id:
        # Another clinic's case is indistinguishable from a missing one (404, not 403).
        raise _not_found(action, case_id, "other_clinic")
    return case


# --------------------------------------------------------------------------- API side


def create_case(
    session: Session,
    *,
    keyring: Keyring,
    principal: Principal,
    actor: audit.Actor,
    image: NewImage,
    client_ref: str | None,
    priority: Priority,
    idempotency_key: str | None = None,
) -> tuple[Case, bool]:
    """Store a new queued case with its encrypted image; returns (case, created).

    With an ``idempotency_key`` the same key and the same image return the existing case
    (``created`` False); the same key with a different image is a :class:`Conflict`.
    """
    clinic_id = _require_clinic(principal, "case.create")
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, clinic_id, idempotency_key)
        if existing is not None:
            return _replay(existing, image), False
    case_id = uuid.uuid4()
    case = Case(
        id=case_id,
        clinic_id=clinic_id,
        status=CaseStatus.QUEUED.value,
        priority=priority.value,
        client_ref=client_ref,
        idempotency_key=idempotency_key,
        image_sha256=image.sha256,
        image_format=image.format,
        image_width=image.width,
        image_height=image.height,
        image_bytes=len(image.data),
        attempts=0,
        created_at=now(),
        updated_at=now(),
    )
    sealed = encrypt_blob(keyring, image.data, case_id=case_id, kind=BlobKind.IMAGE.value)
    try:
        with session.begin_nested():
            session.add(case)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        existing = _by_idempotency_key(session, clinic_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, image), False
    _insert_blobs(session, [(case_id, BlobKind.IMAGE, sealed, image.media_type)])
    audit.record(
        session,
        action="case.create",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=clinic_id,
        detail={
            "priority": priority.value,
            "format": image.format,
            "width": image.width,
            "height": image.height,
            "bytes": len(image.data),
        },
    )
    return case, True


def _by_idempotency_key(session: Session, clinic_id: uuid.UUID, key: str) -> Case | None:
    return session.scalar(select(Case).where(Case.clinic_id == clinic_id, Case.idempotency_key == key))


def _replay(existing: Case, image: NewImage) -> Case:
    if existing.image_sha256 != image.sha256:
        raise Conflict(
            "this Idempotency-Key was already used for a different image; use a new key for a new case",
            code="idempotency_key_reused",
        )
    return existing


#: the columns :func:`_insert_blobs` writes (``created_at`` is the server's)
BLOB_COLUMNS = ("id", "case_id", "kind", "ciphertext", "nonce", "wrapped_key", "kek_id", "media_type")


def _insert_blobs(session: Session, blobs: Sequence[tuple[uuid.UUID, BlobKind, SealedBlob, str]]) -> None:
    """Store (case id, kind, sealed blob, media type) rows in one binary COPY (:mod:`core.pgbinary`:
    the ciphertext travels as raw bytes, not hex), after flushing what they refer to."""
    session.flush()
    pgbinary.copy_in(
        session,
        CaseBlob.__tablename__,
        BLOB_COLUMNS,
        [
            (
                uuid.uuid4(),
                case_id,
                kind.value,
                sealed.ciphertext,
                sealed.nonce,
                sealed.wrapped_key,
                sealed.kek_id,
                media,
            )
            for case_id, kind, sealed, media in blobs
        ],
    )


def get_case(
    session: Session, *, principal: Principal, actor: audit.Actor, case_id: uuid.UUID
) -> tuple[Case, Result | None]:
    case = owned_case(session, principal, case_id, "case.read")
    result = session.get(Result, case_id) if case.status in (CaseStatus.SUCCEEDED, CaseStatus.PURGED) else None
    audit.record(
        session,
        action="case.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"status": case.status},
    )
    return case, result


@dataclass(frozen=True, slots=True)
class Page:
    cases: list[Case]
    next_cursor: str | None
    #: cases of the page whose result is out of distribution (no diagnosis, no heat map)
    out_of_distribution: frozenset[uuid.UUID] = frozenset()


def _encode_cursor(case: Case) -> str:
    raw = json.dumps([case.created_at.isoformat(), str(case.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, case_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), uuid.UUID(case_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise BadRequest("the cursor is not one dermq issued; start again without it", code="invalid_cursor") from None


def list_cases(
    session: Session,
    *,
    principal: Principal,
    actor: audit.Actor,
    status: CaseStatus | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> Page:
    """The clinic's own cases, newest first, ``limit`` at a time."""
    clinic_id = _require_clinic(principal, "case.list")
    query = select(Case).where(Case.clinic_id == clinic_id)
    if status is not None:
        query = query.where(Case.status == status.value)
    if cursor:
        created, case_id = _decode_cursor(cursor)
        query = query.where(or_(Case.created_at < created, and_(Case.created_at == created, Case.id < case_id)))
    rows = list(session.scalars(query.order_by(Case.created_at.desc(), Case.id.desc()).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    unexplained = (
        frozenset(
            session.scalars(
                select(Result.case_id).where(
                    Result.case_id.in_([c.id for c in page]), Result.outcome == Outcome.OUT_OF_DISTRIBUTION
                )
            )
        )
        if page
        else frozenset()
    )
    audit.record(
        session,
        action="case.list",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        clinic_id=clinic_id,
        detail={"count": len(page), "status": status.value if status else None},
    )
    return Page(page, _encode_cursor(page[-1]) if more and page else None, unexplained)


def read_heatmap(
    session: Session, *, keyring: Keyring, principal: Principal, actor: audit.Actor, case_id: uuid.UUID
) -> bytes:
    """The decrypted Grad-CAM overlay PNG of a finished case."""
    case = owned_case(session, principal, case_id, "heatmap.read")
    if case.status == CaseStatus.PURGED:
        raise Gone("this case's images were erased (retention or deletion)", code="case_purged")
    if case.status != CaseStatus.SUCCEEDED:
        raise Conflict(
            f"the case is {case.status}; a heat map exists only once it has succeeded", code="case_not_finished"
        )
    blob = session.scalar(select(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == BlobKind.HEATMAP.value))
    if blob is None:
        result = session.get(Result, case_id)
        out_of_distribution = result is not None and result.outcome == Outcome.OUT_OF_DISTRIBUTION
        raise NotFound(
            "this case has no heat map: the image is out of distribution, so no diagnosis was made and there is "
            "nothing to explain (see result.outcome)"
            if out_of_distribution
            else "this case has no heat map (Grad-CAM ran out of time or failed; see gradcam_status)",
            code="heatmap_unavailable",
        )
    png = decrypt_blob(keyring, blob.sealed, case_id=case_id, kind=BlobKind.HEATMAP.value)
    audit.record(
        session,
        action="heatmap.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
    )
    return png


# --------------------------------------------------------------------------- worker side


#: The order in which queued cases are served: urgent first, then oldest.
QUEUE_ORDER = (sa_case((Case.priority == Priority.URGENT.value, 0), else_=1), Case.created_at)


def _start(*where: ColumnElement[bool]) -> ReturningUpdate[Any]:
    """The UPDATE that moves the cases ``where`` selects to running, counting the attempt."""
    return (
        update(Case)
        .where(*where)
        .values(status=CaseStatus.RUNNING.value, attempts=Case.attempts + 1, started_at=now(), updated_at=now())
        .returning(Case)
    )


def _audit_starts(session: Session, started: list[Case], actor: audit.Actor, batch: int | bool | None = None) -> None:
    audit.record_many(
        session,
        [
            audit.Event(
                "case.start",
                audit.SUCCESS,
                actor,
                "case",
                case.id,
                case.clinic_id,
                {"attempt": case.attempts} | ({"batch": batch} if batch is not None else {}),
            )
            for case in started
        ],
    )


def claim_case(session: Session, case_id: uuid.UUID, *, actor: audit.Actor = audit.SYSTEM) -> Case | None:
    """Move a queued case to running and count the attempt; None if it is not queued (already taken,
    finished or purged), which makes a redelivered message harmless."""
    claimed = session.scalar(_start(Case.id == case_id, Case.status == CaseStatus.QUEUED.value))
    if claimed is None:
        return None
    _audit_starts(session, [claimed], actor)
    return claimed


def claim_batch(session: Session, case_id: uuid.UUID, *, limit: int, actor: audit.Actor = audit.SYSTEM) -> list[Case]:
    """Claim ``case_id`` and up to ``limit - 1`` more queued cases (urgent first, then oldest) in one
    statement, for a worker that classifies them as one batch.

    ``FOR UPDATE SKIP LOCKED`` lets concurrent batches take disjoint sets; each claimed case's own
    message later finds it taken and does nothing. Returns nothing if ``case_id`` itself was not
    queued (another batch took it): that worker is already on it.
    """
    # One statement: our case (if still queued and not locked) plus, only then, the others.
    mine = (
        select(Case.id)
        .where(Case.id == case_id, Case.status == CaseStatus.QUEUED.value)
        .with_for_update(skip_locked=True)
        .cte("mine")
    )
    others = (
        select(Case.id)
        .where(Case.status == CaseStatus.QUEUED.value, Case.id != case_id, exists(select(mine.c.id)))
        .order_by(*QUEUE_ORDER)
        .limit(max(0, limit - 1))
        .with_for_update(skip_locked=True)
        .cte("others")
    )
    claimed = list(
        session.scalars(
            _start(Case.id.in_(union_all(select(mine.c.id), select(others.c.id)))).execution_options(
                synchronize_session=False
            )
        )
    )
    claimed.sort(key=lambda c: c.id != case_id)
    _audit_starts(session, claimed, actor, batch=len(claimed))
    return claimed


def claim_queued(session: Session, *, limit: int, actor: audit.Actor = audit.SYSTEM) -> list[Case]:
    """Claim up to ``limit`` queued cases (urgent first, then oldest) that no one else holds."""
    if limit <= 0:
        return []
    wanted = (
        select(Case.id)
        .where(Case.status == CaseStatus.QUEUED.value)
        .order_by(*QUEUE_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("wanted")
    )
    claimed = list(
        session.scalars(_start(Case.id.in_(select(wanted.c.id))).execution_options(synchronize_session=False))
    )
    _audit_starts(session, claimed, actor, batch=True)
    return claimed


def load_image(session: Session, *, keyring: Keyring, case_id: uuid.UUID) -> bytes:
    return load_images(session, keyring=keyring, case_ids=[case_id])[case_id]


def load_images(session: Session, *, keyring: Keyring, case_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
    """The decrypted images of ``case_ids``, read in one statement."""
    rows = pgbinary.copy_out(  # raw bytes, not hex: see core.pgbinary
        session,
        "SELECT case_id, ciphertext, nonce, wrapped_key, kek_id FROM case_blobs"
        " WHERE case_id = ANY(%(ids)s::uuid[]) AND kind = %(kind)s",
        {"ids": [str(case_id) for case_id in case_ids], "kind": BlobKind.IMAGE.value},
        ("uuid", "bytea", "bytea", "bytea", "text"),
    )
    blobs = {case_id: SealedBlob(ciphertext, nonce, wrapped, kek) for case_id, ciphertext, nonce, wrapped, kek in rows}
    if missing := [case_id for case_id in case_ids if case_id not in blobs]:
        raise NotFound(f"{len(missing)} case(s) have no stored image", code="image_missing")
    return {
        case_id: decrypt_blob(keyring, blobs[case_id], case_id=case_id, kind=BlobKind.IMAGE.value)
        for case_id in case_ids
    }


def _finish(session: Session, case_id: uuid.UUID, attempt: int, values: dict[str, Any]) -> Case | None:
    """Fenced running -> terminal transition; None if this attempt no longer owns the case."""
    return session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.RUNNING.value, Case.attempts == attempt)
        .values(finished_at=now(), updated_at=now(), **values)
        .returning(Case)
    )


@dataclass(frozen=True, slots=True)
class Completion:
    """A worker's outcome for one case it claimed: the result row's values and the heat map PNG."""

    case_id: uuid.UUID
    attempt: int
    result: dict[str, Any]
    heatmap_png: bytes | None


def complete_case(
    session: Session,
    *,
    keyring: Keyring,
    case_id: uuid.UUID,
    attempt: int,
    result: dict[str, Any],
    heatmap_png: bytes | None,
    actor: audit.Actor = audit.SYSTEM,
) -> bool:
    """Store the result (and the encrypted heat map) and mark the case succeeded, atomically."""
    stored = complete_cases(
        session, keyring=keyring, completions=[Completion(case_id, attempt, result, heatmap_png)], actor=actor
    )
    return case_id in stored


def complete_cases(
    session: Session, *, keyring: Keyring, completions: Sequence[Completion], actor: audit.Actor = audit.SYSTEM
) -> set[uuid.UUID]:
    """Store each completion's result (and encrypted heat map) and mark its case succeeded, all in the
    caller's transaction; returns the ids stored. A completion whose attempt no longer owns its case
    (taken over or purged meanwhile) is left out, and nothing of it is written.

    A fixed number of statements however many cases: one fenced UPDATE over a VALUES list, one INSERT
    per table, one audit append. That is what lets a worker draining a backlog store a batch for
    about the cost of one case.
    """
    if not completions:
        return set()
    fence = values(column("id", Uuid()), column("attempt", Integer()), column("model_id", String()), name="done").data(
        [(c.case_id, c.attempt, c.result["model_id"]) for c in completions]
    )
    finished_at = now()
    rows = session.execute(
        update(Case)
        .where(
            Case.id == fence.c.id,
            Case.status == CaseStatus.RUNNING.value,
            Case.attempts == fence.c.attempt,
        )
        .values(
            status=CaseStatus.SUCCEEDED.value,
            model_id=fence.c.model_id,
            failure_code=None,
            failure_message=None,
            finished_at=finished_at,
            updated_at=finished_at,
        )
        .returning(Case.id, Case.clinic_id)
        .execution_options(synchronize_session=False)
    ).all()
    clinics = {case_id: clinic_id for case_id, clinic_id in rows}
    stored = [c for c in completions if c.case_id in clinics]
    session.add_all([Result(case_id=c.case_id, **c.result) for c in stored])
    _insert_blobs(
        session,
        [
            (
                c.case_id,
                BlobKind.HEATMAP,
                encrypt_blob(keyring, c.heatmap_png, case_id=c.case_id, kind=BlobKind.HEATMAP.value),
                "image/png",
            )
            for c in stored
            if c.heatmap_png is not None
        ],
    )
    audit.record_many(
        session,
        [
            audit.Event(
                "case.classify",
                audit.SUCCESS,
                actor,
                "case",
                c.case_id,
                clinics[c.case_id],
                {
                    "attempt": c.attempt,
                    "model_id": c.result["model_id"],
                    "outcome": c.result.get("outcome", Outcome.DIAGNOSIS.value),
                    "gradcam": c.result["gradcam_status"],
                },
            )
            for c in stored
        ],
    )
    return set(clinics)


def fail_case(
    session: Session,
    *,
    case_id: uuid.UUID,
    attempt: int | None,
    code: str,
    message: str,
    actor: audit.Actor = audit.SYSTEM,
) -> bool:
    """Mark a running case (this attempt's, or any attempt's when ``attempt`` is None) failed."""
    values = {"status": CaseStatus.FAILED.value, "failure_code": code, "failure_message": message[:2000]}
    if attempt is None:
        case = session.scalar(
            update(Case)
            .where(Case.id == case_id, Case.status.in_([CaseStatus.RUNNING.value, CaseStatus.QUEUED.value]))
            .values(finished_at=now(), updated_at=now(), **values)
            .returning(Case)
        )
    else:
        case = _finish(session, case_id, attempt, values)
    if case is None:
        return False
    audit.record(
        session,
        action="case.fail",
        outcome=audit.FAILURE,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"attempt": case.attempts, "code": code},
    )
    return True


def requeue_case(
    session: Session, case_id: uuid.UUID, *, attempt: int, reason: str, actor: audit.Actor = audit.SYSTEM
) -> bool:
    """Put a running case back in the queue (recovery, retry); fenced by attempt like the others."""
    case = session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.RUNNING.value, Case.attempts == attempt)
        .values(status=CaseStatus.QUEUED.value, updated_at=now(), started_at=None)
        .returning(Case)
    )
    if case is None:
        return False
    audit.record(
        session,
        action="case.requeue",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"attempt": attempt, "reason": reason},
    )
    return True


def mark_published(session: Session, case_ids: list[uuid.UUID]) -> None:
    if case_ids:
        session.execute(update(Case).where(Case.id.in_(case_ids)).values(published_at=now()))


def delete_blobs(session: Session, case_id: uuid.UUID) -> int:
    """Crypto-shred: remove every ciphertext and wrapped data key of the case."""
    deleted = session.execute(delete(CaseBlob).where(CaseBlob.case_id == case_id))
    return int(getattr(deleted, "rowcount", 0) or 0)


__all__ = [
    "DermqError",
    "NewImage",
    "Page",
    "claim_case",
    "complete_case",
    "create_case",
    "delete_blobs",
    "fail_case",
    "get_case",
    "list_cases",
    "load_image",
    "mark_published",
    "read_heatmap",
    "requeue_case",
]
