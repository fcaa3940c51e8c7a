"""Case services of the API: who may touch a case, submitting one, and the blobs it stores.

A clinic's reads of a case (the case, a long poll's look, the heat map) are :mod:`core.case_reads`,
its list :mod:`core.case_list`; the worker's side of the state machine (claim, complete, fail,
requeue) is :mod:`core.case_states`.

Every function takes a keyword-only ``session`` and only flushes; the caller's scope commits. Every
access to patient data and every state change records an audit event, last, inside the same
transaction (see :mod:`core.audit` for why last). Denials raise an error that carries a
:class:`core.audit.PendingEvent`, which the API writes in a transaction of its own.

State machine: ``queued -> running -> succeeded | failed``, ``running -> queued`` (recovery), and
any terminal or queued state ``-> purged`` once the images are crypto-shredded. Worker transitions
are fenced by the attempt number, so a stale worker can never overwrite a newer run's outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, delete, exists, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, make_transient_to_detached

from core import audit, credential_locks, idempotency, keys, period_shredding, pgbinary, phi
from core.crypto import Keyring, SealedBlob, encrypt_blob
from core.db import commit_durably
from core.errors import Conflict, DermqError, Forbidden, Gone, NotFound, ServiceUnavailable, a_or_an
from core.keys import Principal
from core.models import ApiKey, BlobKind, Case, CaseBlob, CaseStatus, Clinic, Priority, Role


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class WorkingCopy:
    """A large upload's pixels at the size the worker needs, as the intake's decode made them."""

    data: bytes
    media_type: str


@dataclass(frozen=True, slots=True)
class NewImage:
    """An upload: the bytes as sent plus what its header declares (``ml.images.read_header``)."""

    data: bytes
    format: str
    media_type: str
    width: int
    height: int
    sha256: str


# --------------------------------------------------------------------------- access control


def require_clinic(principal: Principal, action: str, entity_id: str | None = None) -> uuid.UUID:
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        raise Forbidden(
            f"{a_or_an(principal.role.value)} key cannot do this; use a clinic key",
            code="role_not_allowed",
            audit=audit.PendingEvent(
                action, audit.DENIED, "case", entity_id, {"reason": "role", "role": principal.role.value}
            ),
        )
    return principal.clinic_id


def _not_found(action: str, case_id: uuid.UUID | str, owner: uuid.UUID | None = None) -> NotFound:
    """A 404 for a case the caller's clinic does not have. The denial is filed under the caller's
    clinic and, when the case exists, under its owner's too; both with the one reason ``not_found``,
    so that no clinic's auditors can tell another clinic's case from a missing one."""
    return NotFound(
        "no such case for this clinic",
        code="case_not_found",
        audit=audit.PendingEvent(
            action, audit.DENIED, "case", str(case_id), {"reason": "not_found"}, also_clinic_id=owner
        ),
    )


def owned_case(
    session: Session, principal: Principal, case_id: uuid.UUID, action: str, *, for_update: bool = False
) -> Case:
    clinic_id = require_clinic(principal, action, str(case_id))
    if not for_update:
        return owned(session.get(Case, case_id), clinic_id, action, case_id)
    # only a case of the caller's clinic is locked: another clinic's, locked while its own worker or
    # request held it, made the caller wait (telling it the case exists) and held up that clinic's work
    case = session.scalar(
        select(Case)
        .where(Case.id == case_id, Case.clinic_id == clinic_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if case is None:
        owner = session.scalar(select(Case.clinic_id).where(Case.id == case_id))  # for the refusal's trace
        raise _not_found(action, case_id, owner=owner)
    return case


def owned(case: Case | None, clinic_id: uuid.UUID, action: str, case_id: uuid.UUID) -> Case:
    """``case`` (as read for ``case_id``) if the clinic owns it; else a 404 for ``action``."""
    if case is None:
        raise _not_found(action, case_id)
    if case.clinic_id != clinic_id:
        # Another clinic's case is indistinguishable from a missing one (404, not 403).
        raise _not_found(action, case_id, owner=case.clinic_id)
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

    The principal's key is checked again by the INSERT itself (see ``_INSERT_CASE``): a key revoked,
    or its clinic deactivated, since the request was authenticated is refused as authentication refuses
    it (:class:`~core.errors.Unauthorized`, no audit event: the caller files it), and nothing is stored.
    """
    clinic_id = require_clinic(principal, "case.create")
    again = _Resubmission(image, client_ref, priority)
    stored_key = None if idempotency_key is None else idempotency.digest(keyring, clinic_id, idempotency_key)
    case_id, at = uuid.uuid4(), now()
    row = {
        "id": case_id,
        "clinic_id": clinic_id,
        "status": CaseStatus.QUEUED.value,
        "priority": priority.value,
        "client_ref": None,
        "idempotency_key": stored_key,  # a keyed digest, never the key (core.idempotency)
        "image_sha256": image.sha256,
        "image_format": image.format,
        "image_width": image.width,
        "image_height": image.height,
        "image_bytes": len(image.data),
        "attempts": 0,
        "created_at": at,
        "updated_at": at,
        **dict.fromkeys(_UNSET_AT_CREATION),
    }
    # the key of the case's period, held against destruction until this transaction ends
    wrap = period_shredding.wrapping_key(session, keyring, at)
    sealed = encrypt_blob(keyring, image.data, case_id=case_id, kind=BlobKind.IMAGE.value, kek_id=wrap)
    credential_locks.hold_for_a_case(session, principal.key_id, clinic_id)  # sent with the INSERT, before it
    if session.scalar(_INSERT_CASE, {**row, "plain_key": idempotency_key, "key_id": principal.key_id}) is None:
        # Its key revoked or its clinic deactivated since the request was authenticated: refused, a
        # resubmission's answer with it (it holds the case's client reference and result)
        keys.require_still_valid(session, principal.key_id)
        # The clinic already has a case under this idempotency key: a resubmission (or a concurrent
        # request with the same key that won the race; the insert waited for its commit); or one
        # stored with the key as sent, by a release before migration 0013 (core.idempotency).
        existing = None
        if idempotency_key is not None:
            assert stored_key is not None
            # digest, as sent, digest again: the sweeper may digest the plain key between the first two
            existing = (
                _by_idempotency_key(session, clinic_id, stored_key)
                or idempotency.legacy_case(session, clinic_id, idempotency_key)
                or _by_idempotency_key(session, clinic_id, stored_key)
            )
        if existing is None:
            raise ServiceUnavailable("the case could not be stored; send it again", retry_after=1)
        return _replay(session, existing, again, keyring, actor), False
    # The row went in through Core (one statement, no savepoint, no unit of work); the caller gets
    # it as a persistent Case of this session, every column loaded, without a second INSERT.
    case = Case(**{k: v for k, v in row.items() if k != "client_ref"}, plain_client_ref=None)
    make_transient_to_detached(case)
    session.add(case)
    blobs = [(case_id, BlobKind.IMAGE, sealed, image.media_type)]
    if client_ref is not None:  # sealed like the image, never a plain column (core.phi)
        blobs.append(
            (case_id, BlobKind.CLIENT_REF, phi.seal_client_ref(keyring, case_id, client_ref, wrap), phi.MEDIA_TYPE)
        )
    insert_blobs(session, blobs)
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
            # sizes to one decimal: exact ones, kept in an append-only record for good, would find the
            # case from a copy of the photo after its erasure (as its SHA-256 would)
            "format": image.format,
            "megapixels": round(image.width * image.height / 1e6, 1),
            "megabytes": round(len(image.data) / 1e6, 1),
        },
    )
    return case, True


def add_working_copy(session: Session, *, keyring: Keyring, case: Case, copy: WorkingCopy) -> None:
    """Store the working copy of ``case``, which this transaction created: the intake stores a case
    while its upload is still decoding, and its working copy once the decode has made it. Sealed
    under the case's period key, like the case's other blobs."""
    wrap = period_shredding.wrapping_key(session, keyring, case.created_at)
    sealed = encrypt_blob(keyring, copy.data, case_id=case.id, kind=BlobKind.WORKING.value, kek_id=wrap)
    insert_blobs(session, [(case.id, BlobKind.WORKING, sealed, copy.media_type)])


def confirm_stored(session: Session, case_id: uuid.UUID) -> bool:
    """Whether the case is stored; once this transaction commits, on disk. For an answer that tells a
    client its case was accepted when the case's own commit did not wait for the disk
    (:func:`core.db.commit_without_flush`) and no write of the answer's own follows it. The row is
    locked ``FOR KEY SHARE`` (the weakest row lock: a worker's claim, ``FOR NO KEY UPDATE``, passes it):
    a row lock is written to the WAL, so this transaction's commit, made to wait for the disk, flushes
    the WAL up to it, the case's commit with it (the WAL is one sequence, flushed in order). A
    transaction that writes nothing commits without waiting for the disk whatever
    ``synchronous_commit`` says, so a plain read would prove nothing. (SQLAlchemy writes ``FOR KEY
    SHARE`` for ``read=True, key_share=True``; ``key_share=True`` alone is ``FOR NO KEY UPDATE``, which
    the claims' own lock skips.)"""
    commit_durably(session)
    held = select(Case.id).where(Case.id == case_id).with_for_update(read=True, key_share=True)
    return session.scalar(held) is not None


#: the columns a new case leaves empty (set explicitly: the Case the caller gets needs no reload)
_UNSET_AT_CREATION = (
    "started_at",
    "finished_at",
    "published_at",
    "purged_at",
    "failure_code",
    "failure_message",
    "model_id",
)
_CASES = cast(Table, Case.__table__)
#: the columns a new case's row sets: all of them (create_case's ``row`` names each one)
_ROW = tuple(_CASES.c.keys())
_PLAIN_KEY = bindparam("plain_key", type_=_CASES.c.idempotency_key.type)
#: a new case's row, or nothing if its clinic already has a case under that idempotency key: under
#: its digest (the unique index), or as sent (``plain_key``: stored by a release before migration
#: 0013, or by one of its processes during a rolling upgrade); one statement, no look-up before it.
#: A case found under the key as sent holds it in plain text exactly when the key as sent is not of a
#: digest's form, so that is asked of the key, once, not of each row: Postgres without statistics on
#: ``cases`` (no autovacuum) read the clinic's cases by their clinic and time index and matched the
#: pattern against every one of them, at every intake.
#: Nothing either if the key (``key_id``) was revoked or its clinic deactivated since the request was
#: authenticated (a slow upload, a remembered key), as of the locks taken in front of it
#: (:mod:`core.credential_locks`): a change committed before is seen, one after waits for this case.
_KEY_STILL_VALID = (
    select(Clinic.id)
    .join(ApiKey, ApiKey.clinic_id == Clinic.id)
    .where(
        Clinic.id == bindparam("clinic_id"),
        Clinic.active,
        ApiKey.id == bindparam("key_id"),
        ApiKey.revoked_at.is_(None),
    )
    .exists()
)
_INSERT_CASE = (
    pg_insert(_CASES)
    .from_select(
        list(_ROW),
        select(*(bindparam(name, type_=_CASES.c[name].type) for name in _ROW)).where(
            _KEY_STILL_VALID,
            ~exists().where(
                _CASES.c.clinic_id == bindparam("clinic_id"),
                _CASES.c.idempotency_key == _PLAIN_KEY,
                idempotency.plain(_PLAIN_KEY),
            ),
        ),
    )
    .on_conflict_do_nothing(constraint="uq_cases_clinic_idempotency_key")
    .returning(_CASES.c.id)
)


def _by_idempotency_key(session: Session, clinic_id: uuid.UUID, key: str) -> Case | None:
    return session.scalar(select(Case).where(Case.clinic_id == clinic_id, Case.idempotency_key == key))


@dataclass(frozen=True, slots=True)
class _Resubmission:
    image: NewImage
    client_ref: str | None
    priority: Priority


def _replay(session: Session, existing: Case, again: _Resubmission, keyring: Keyring, actor: audit.Actor) -> Case:
    """The existing case of a resubmission (audited: the answer holds its client reference and result),
    or a 409 (audited as a denied ``case.create``) when the key came with another image, client
    reference or priority: what was sent would otherwise be silently dropped; a 410 when the case was
    erased (its client reference with it: nothing left to compare what was sent with)."""
    # The case as it is now, held FOR KEY SHARE until the answer is made (a worker's claim and store pass
    # that lock): an erasure under way is waited for and seen, and one that comes later waits for it.
    session.refresh(existing, with_for_update={"read": True, "key_share": True})
    if existing.status == CaseStatus.PURGED.value:
        raise Gone(
            "the case sent with this Idempotency-Key was erased (retention or deletion); "
            "to submit the image again, use a new key",
            code="case_purged",
            audit=audit.PendingEvent("case.create", audit.DENIED, "case", str(existing.id), {"reason": "purged"}),
        )
    with phi.refused_if_destroyed("case.create", existing.id):  # nothing left to compare the reference with
        sent_ref = phi.client_refs(session, keyring, [existing])[existing.id]
    differs = [
        name
        for name, same in (
            ("image", existing.image_sha256 == again.image.sha256),
            ("priority", existing.priority == again.priority.value),
            ("client_ref", sent_ref == again.client_ref),
        )
        if not same
    ]
    if differs:
        raise Conflict(
            f"this Idempotency-Key was already used with a different {' and '.join(differs)}; "
            "resend exactly what was sent, or use a new key for a new case",
            code="idempotency_key_reused",
            audit=audit.PendingEvent(
                "case.create", audit.DENIED, "case", str(existing.id), {"reason": "idempotency_key_reused"}
            ),
        )
    audit.record(
        session,
        action="case.replay",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=existing.id,
        clinic_id=existing.clinic_id,
        detail={"status": existing.status},
    )
    return existing


#: the columns :func:`_insert_blobs` writes (``created_at`` is the server's)
BLOB_COLUMNS = ("id", "case_id", "kind", "ciphertext", "nonce", "wrapped_key", "kek_id", "media_type")


def insert_blobs(session: Session, blobs: Sequence[tuple[uuid.UUID, BlobKind, SealedBlob, str]]) -> None:
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


def delete_blobs(session: Session, case_id: uuid.UUID) -> int:
    """Crypto-shred: remove every ciphertext and wrapped data key of the case."""
    deleted = session.execute(delete(CaseBlob).where(CaseBlob.case_id == case_id))
    return int(getattr(deleted, "rowcount", 0) or 0)


__all__ = [
    "DermqError",
    "NewImage",
    "create_case",
    "delete_blobs",
    "insert_blobs",
    "owned",
    "owned_case",
]
