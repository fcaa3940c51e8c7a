"""Advisory locks that order a case's storing against a revocation of its key or a deactivation of
its clinic: once either has committed, no case of that key or clinic is stored.

A submission authenticates when it begins (from the API's key cache, or the database) and stores its
case later, after its upload and its decode. Its INSERT checks the key and its clinic again
(:data:`core.cases._INSERT_CASE`), but a change that commits while the INSERT runs would still miss
it. So each submission's transaction holds the key's and the clinic's locks shared, taken in the
round trip of its INSERT and in front of it (:mod:`core.deferred`: the INSERT reads the database as it
is once the locks are held), and a revocation or a deactivation takes its one lock exclusively
before it changes the row: it waits for the submissions already storing (their decode and storing:
milliseconds, up to about a second for a camera image) and they for it, then see it.

Advisory locks rather than row locks (``FOR SHARE`` on the two rows): the lock manager queues a
request behind an exclusive one already waiting, so a revocation waits only for the submissions in
flight when it asked, whereas new ``FOR SHARE`` lockers join the ones holding a row ahead of a
waiting ``FOR UPDATE``: a key kept busy (a leaked one, four uploads at a time) could never be
revoked, its command failing at its lock timeout. And an advisory lock writes nothing: a row lock
writes the row (a WAL record, a multixact when submissions overlap) at every submission.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from core import deferred

#: first keys of the locks ("dqak", "dqcl"): an API key's, a clinic's
KEY_LOCKS, CLINIC_LOCKS = 0x6471616B, 0x6471636C

_HOLD_BOTH_SHARED = (
    "SELECT pg_advisory_xact_lock_shared(%(keys)s, %(key)s), pg_advisory_xact_lock_shared(%(clinics)s, %(clinic)s)"
)
_HOLD_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(:cls, :key)")


def _lock_key(value: uuid.UUID) -> int:
    """The second key of a lock: 32 bits of the id (two ids that share them only wait for each other)."""
    return int.from_bytes(value.bytes[:4], "big", signed=True)


def hold_for_a_case(session: Session, key_id: uuid.UUID, clinic_id: uuid.UUID) -> None:
    """Hold ``key_id``'s and ``clinic_id``'s locks shared until the transaction ends, taken in front of
    its next statement: the case's INSERT, which then sees any revocation or deactivation committed."""
    params = {"keys": KEY_LOCKS, "key": _lock_key(key_id), "clinics": CLINIC_LOCKS, "clinic": _lock_key(clinic_id)}
    deferred.defer(session, _HOLD_BOTH_SHARED, params)


def hold_key_for_a_change(session: Session, key_id: uuid.UUID) -> None:
    """Hold ``key_id``'s lock exclusively until the transaction ends (a revocation, before its UPDATE)."""
    session.execute(_HOLD_EXCLUSIVE, {"cls": KEY_LOCKS, "key": _lock_key(key_id)})


def hold_clinic_for_a_change(session: Session, clinic_id: uuid.UUID) -> None:
    """Hold ``clinic_id``'s lock exclusively until the transaction ends (a deactivation, before its UPDATE)."""
    session.execute(_HOLD_EXCLUSIVE, {"cls": CLINIC_LOCKS, "key": _lock_key(clinic_id)})
