"""Idempotency keys at rest: a case keeps a keyed digest of the ``Idempotency-Key`` it was sent
with, never the key itself.

A clinic's portal chooses the key, and may build it from what it knows of the visit (a record number
and a date); it outlives the case's erasure, so that a late retry of an erased case is answered 410
rather than made a new case. So it is stored as ``hmac-sha256:`` and the hex HMAC-SHA256 of the
clinic's id and the key, under a key derived from the server-side pepper of the key file (the API
keys' own, :mod:`core.keys`, under another label): the same key sent again finds its case, a stolen
database does not give the keys back, a guess cannot be checked offline without the key file, and one
key used by two clinics gives two unrelated digests. With the key file (its pepper is never rotated)
and a copy of the database, a guess can be checked, an erased case's too: a key built from a record
number and a date could be found by trying them, which is why docs/API.md asks portals for random keys.

Cases stored before migration 0013 kept the key in plain text. The sweeper replaces those with their
digests in batches (:func:`digest_plain_keys`); until none are left, the intake looks a key up in
plain text too (:func:`legacy_case`), so a retry of a case sent before the upgrade still finds it.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.crypto import Keyring
from core.models import DIGESTED_KEY, Case

PREFIX = "hmac-sha256:"
_LABEL = b"dermq idempotency-key v1"


def plain(key: ColumnElement[Any] | InstrumentedAttribute[Any]) -> ColumnElement[bool]:
    """Whether ``key`` is not exactly a digest's form (a key held as sent, or one that merely starts
    like a digest: digested too)."""
    return key.op("!~")(DIGESTED_KEY)


#: cases whose key is still in plain text (written before migration 0013, or by a process of the
#: release before during a rolling upgrade); a partial index answers
PLAIN: ColumnElement[bool] = plain(Case.idempotency_key)


def digest(keyring: Keyring, clinic_id: uuid.UUID, key: str) -> str:
    """What a case stores for ``key`` sent by ``clinic_id``."""
    subkey = hmac.new(keyring.api_key_pepper, _LABEL, hashlib.sha256).digest()
    return PREFIX + hmac.new(subkey, clinic_id.bytes + key.encode(), hashlib.sha256).hexdigest()


def legacy_case(session: Session, clinic_id: uuid.UUID, key: str) -> Case | None:
    """The case ``clinic_id`` sent with ``key`` that holds it in plain text, if any: stored before
    migration 0013, or meanwhile by an API process of the release before (a rolling upgrade). The
    intake's insert checks for one in the same statement (core.cases) and asks this only when it
    stored nothing: a retry that reached an old process must still find its case."""
    return session.scalar(select(Case).where(Case.clinic_id == clinic_id, Case.idempotency_key == key, PLAIN))


def digest_plain_keys(session: Session, keyring: Keyring, *, limit: int = 500) -> int:
    """Replace up to ``limit`` keys still stored in plain text with their digests; returns how many.
    Cheap once none are left (the partial index answers).

    Where the clinic already has a case under that digest (a retry stored by each release during a
    rolling upgrade, or after a downgrade), the later retry's case was a second case for the key:
    the plain one's key is dropped and the digest keeps finding the case that holds it."""
    legacy = session.execute(
        select(Case.id, Case.clinic_id, Case.idempotency_key)
        .where(PLAIN)
        .order_by(Case.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for case_id, clinic_id, key in legacy:  # PLAIN holds no NULL key
        digested = digest(keyring, clinic_id, str(key))
        taken = session.scalar(select(Case.id).where(Case.clinic_id == clinic_id, Case.idempotency_key == digested))
        session.execute(update(Case).where(Case.id == case_id).values(idempotency_key=None if taken else digested))
    return len(legacy)
