"""API keys: creation (the secret is shown once), authentication, listing and revocation.

A key looks like ``dq_<prefix>_<secret>``. The database keeps the prefix (for lookup) and an
HMAC-SHA256 of the whole key under a server-side pepper from the key file, so a stolen database
does not yield usable keys and a guess cannot be checked offline.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import announcements, audit, credential_locks
from core.clinics import hides_characters
from core.crypto import Keyring
from core.errors import BadRequest, InvalidInput, NotFound, Unauthorized
from core.models import ApiKey, Clinic, Role

TOKEN_RE = re.compile(r"^dq_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    key_id: uuid.UUID
    role: Role
    clinic_id: uuid.UUID | None


def _digest(keyring: Keyring, token: str) -> bytes:
    return hmac.new(keyring.api_key_pepper, token.encode(), hashlib.sha256).digest()


def create_key(
    session: Session,
    keyring: Keyring,
    *,
    role: Role,
    clinic_id: uuid.UUID | None,
    label: str = "",
    actor: audit.Actor = audit.SYSTEM,
) -> tuple[ApiKey, str]:
    """A new key and its secret token. The token is returned once and stored only as a keyed hash."""
    if len(label) > 200:  # refused, as the API refuses it (invalid_input): a label cut short reads as another one
        raise InvalidInput("a key's label is at most 200 characters", code="invalid_key_label")
    if hides_characters(label):  # `dermq key list` and the audit trail show it as it is
        raise InvalidInput(
            "a key's label holds visible characters only: no control, zero-width, filler or direction characters",
            code="invalid_key_label",
        )
    if role is Role.CLINIC and clinic_id is None:
        raise BadRequest("a clinic key needs a clinic", code="clinic_required")
    if role is Role.ADMIN and clinic_id is not None:  # it would limit nothing: admin keys act on every clinic
        raise BadRequest("an admin key acts on every clinic: it takes no clinic", code="clinic_not_allowed")
    if clinic_id is not None:
        clinic = session.get(Clinic, clinic_id)
        if clinic is None:
            raise NotFound("no such clinic", code="clinic_not_found")
        if not clinic.active:
            raise BadRequest("the clinic is deactivated; reactivate it before issuing keys", code="clinic_inactive")
    prefix = secrets.token_hex(6)
    token = f"dq_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=uuid.uuid4(),
        prefix=prefix,
        secret_hash=_digest(keyring, token),
        role=role.value,
        clinic_id=clinic_id,
        label=label,
    )
    session.add(key)
    session.flush()
    audit.record(
        session,
        action="key.create",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="api_key",
        entity_id=key.id,
        clinic_id=clinic_id,
        detail={"role": role.value, "prefix": prefix},
    )
    return key, token


def token_prefix(token: str | None) -> str | None:
    """The lookup prefix of a well-formed token (not secret: it names the key), else None."""
    match = TOKEN_RE.match(token) if token else None
    return match[1] if match else None


class NoSuchKey(Unauthorized):
    """The token names no key (none sent, malformed, or a prefix no key has): the same answer as any
    refusal, told apart only so that failed logins are counted where they belong (api.deps)."""


def authenticate(session: Session, keyring: Keyring, token: str | None) -> Principal:
    """The principal for a bearer token; raises :class:`Unauthorized` with a reason code otherwise
    (:class:`NoSuchKey` when the token names no key)."""
    if not token:
        raise NoSuchKey("send an API key as 'Authorization: Bearer <key>'", code="missing_credentials")
    match = TOKEN_RE.match(token)
    if match is None:
        raise NoSuchKey("the API key is malformed", code="invalid_credentials")
    row = session.execute(
        select(ApiKey, Clinic.active).outerjoin(Clinic, Clinic.id == ApiKey.clinic_id).where(ApiKey.prefix == match[1])
    ).first()
    if row is None:
        _digest(keyring, token)  # same work either way: no timing hint about which prefixes exist
        raise NoSuchKey("the API key is not valid", code="invalid_credentials")
    key, clinic_active = row
    if not hmac.compare_digest(key.secret_hash, _digest(keyring, token)):
        raise _refused("invalid_credentials", key)
    if key.revoked_at is not None:
        raise _refused("revoked_credentials", key)
    if key.clinic_id is not None and clinic_active is False:
        raise _refused("clinic_inactive", key)
    return Principal(key.id, Role(key.role), key.clinic_id)


_REFUSALS = {
    "invalid_credentials": "the API key is not valid",
    "revoked_credentials": "the API key has been revoked",
    "clinic_inactive": "the clinic of this API key is deactivated",
}


def _refused(reason: str, key: ApiKey | None = None) -> Unauthorized:
    """The refusal; for a key that exists (a wrong secret, revoked, its clinic deactivated), its
    ``auth.denied`` event names the key and is filed under its clinic (:func:`api.deps.record_denial`:
    once, the caller having no clinic): a leaked key still in use after its revocation was recorded
    with neither, and its clinic's auditors never saw it."""
    pending = None
    if key is not None:
        detail = {"reason": reason, "key_id": str(key.id), "key_prefix": f"dq_{key.prefix}"}
        pending = audit.PendingEvent("auth.denied", audit.DENIED, "api_key", str(key.id), detail, key.clinic_id)
    return Unauthorized(_REFUSALS[reason], code=reason, audit=pending)


def require_still_valid(session: Session, key_id: uuid.UUID) -> None:
    """Raise :class:`Unauthorized`, as :func:`authenticate` would, once the key authenticated earlier in
    a long request has been revoked, deleted or its clinic deactivated (see :func:`still_valid`)."""
    reason = still_valid(session, key_id)
    if reason is not None:
        raise _refused(reason)


def still_valid(session: Session, key_id: uuid.UUID) -> str | None:
    """None while the key can still be used; otherwise why not (``revoked_credentials``,
    ``clinic_inactive``, or ``invalid_credentials`` for a key that is gone). For work that outlives the
    request that authenticated it, such as a streamed export."""
    row = session.execute(
        select(ApiKey.revoked_at, Clinic.active)
        .outerjoin(Clinic, Clinic.id == ApiKey.clinic_id)
        .where(ApiKey.id == key_id)
    ).first()
    if row is None:
        return "invalid_credentials"
    revoked_at, clinic_active = row
    if revoked_at is not None:
        return "revoked_credentials"
    if clinic_active is False:
        return "clinic_inactive"
    return None


def revoke_key(session: Session, key_id: uuid.UUID, *, actor: audit.Actor = audit.SYSTEM) -> ApiKey:
    # once the cases being stored with it are (core.credential_locks); read again under the lock (a
    # caller may have loaded the key before another change committed)
    credential_locks.hold_key_for_a_change(session, key_id)
    key = session.get(ApiKey, key_id, with_for_update=True, populate_existing=True)
    if key is None:
        raise NotFound("no such API key", code="key_not_found")
    unchanged = key.revoked_at is not None  # revoked before: when stays what it was
    if not unchanged:
        key.revoked_at = datetime.now(UTC)
        session.flush()
        announcements.announce_keys_changed(session)
    audit.record(
        session,
        action="key.revoke",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="api_key",
        entity_id=key.id,
        clinic_id=key.clinic_id,
        detail={"prefix": key.prefix, **({"unchanged": True} if unchanged else {})},
    )
    return key


def find_key(session: Session, reference: str) -> uuid.UUID:
    """A key's id from its id, its prefix (``0a1b2c3d4e5f``) or the form ``dq_0a1b2c3d4e5f_...`` that
    ``dermq key list`` prints; :class:`NotFound` otherwise."""
    try:
        return uuid.UUID(reference)
    except ValueError:
        pass
    prefix = reference.strip().removeprefix("dq_").split("_", 1)[0].rstrip(".")
    found = session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) if prefix else None
    if found is None:
        raise NotFound("no such API key", code="key_not_found")
    return found


def list_keys(session: Session, *, clinic_id: uuid.UUID | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if clinic_id is not None:
        query = query.where(ApiKey.clinic_id == clinic_id)
    return list(session.scalars(query))
