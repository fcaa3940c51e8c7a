"""Idempotency keys at rest: a case keeps a keyed digest of the ``Idempotency-Key`` it was sent
with, never the key itself.

A clinic's portal chooses the key, and may build it from what it knows of the visit (a record number
and a date); it outlives the case's erasure, so that a late retry of an erased case is answered 410
rather than made a new case. So it is stored as ``hmac-sha256:`` and the hex HMAC-SHA256 of the
clinic's id and the key, under a key derived from the server-side pepper of the key file (the API
keys' own, :mod:`core.keys`, under another label): the same key sent again finds its case, a stolen
database does not give the keys back, a guess cannot be checked offline, and one key used by two
clinics gives two unrelated digests.

Cases stored before migration 0013 kept the key in plain text. The sweeper replaces those with their
digests in batches (:func:`digest_plain_keys`); until none are left, the intake looks a key up in
plain text too (:func:`legacy_case`), so a retry of a case sent before the upgrade still finds it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.orm import Session

from core.crypto import Keyring
from core.models import Case

PREFIX = "hmac-sha256:"
_LABEL = b"dermq idempotency-key v1"

#: cases whose key is still in plain text (written before migration 0013); a partial index answers
PLAIN: ColumnElement[bool] = ~func.starts_with(Case.idempotency_key, PREFIX)

#: after a look found no plain key, seconds before this process looks again: an API process of the
#: release before (a rolling upgrade) may still store one meanwhile
RECHECK_SECONDS = 60.0
_none_left_at: float | None = None  # when a look last found no plain key in the database


def digest(keyring: Keyring, clinic_id: uuid.UUID, key: str) -> str:
    """What a case stores for ``key`` sent by ``clinic_id``."""
    subkey = hmac.new(keyring.api_key_pepper, _LABEL, hashlib.sha256).digest()
    return PREFIX + hmac.new(subkey, clinic_id.bytes + key.encode(), hashlib.sha256).hexdigest()


def legacy_case(session: Session, clinic_id: uuid.UUID, key: str) -> Case | None:
    """The case ``clinic_id`` sent with ``key`` before migration 0013, if its key is still in plain
    text. Once a look finds no plain key left in the database, this process skips the look for
    :data:`RECHECK_SECONDS`."""
    global _none_left_at
    checked = _none_left_at
    if checked is not None and time.monotonic() - checked < RECHECK_SECONDS:
        return None
    found = session.scalar(select(Case).where(Case.clinic_id == clinic_id, Case.idempotency_key == key, PLAIN))
    if found is None and not session.scalar(select(exists().where(PLAIN))):
        _none_left_at = time.monotonic()
    return found


def digest_plain_keys(session: Session, keyring: Keyring, *, limit: int = 500) -> int:
    """Replace up to ``limit`` keys still stored in plain text with their digests; returns how many.
    Cheap once none are left (the partial index answers)."""
    legacy = session.execute(
        select(Case.id, Case.clinic_id, Case.idempotency_key)
        .where(PLAIN)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for case_id, clinic_id, key in legacy:  # PLAIN holds no NULL key
        session.execute(
            update(Case).where(Case.id == case_id).values(idempotency_key=digest(keyring, clinic_id, str(key)))
        )
    return len(legacy)
