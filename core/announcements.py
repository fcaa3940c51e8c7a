"""Announcements the API listens for: a case's end (its long polls, ``?wait=``) and a change to
which API keys are valid (its cache of verified keys).

The transaction that finishes cases (a result stored, a failure recorded) also runs
``pg_notify`` on one channel with their ids. Postgres delivers a notification only when that
transaction commits, so a listener never hears of a case before it can read the case's end, and
never of one that was rolled back. A notification carries case ids only: no patient data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from core import deferred

#: The Postgres channels the API listens on.
CHANNEL = "dermq_case_finished"
KEYS_CHANNEL = "dermq_keys_changed"
#: Ids per notification (a payload holds at most 8000 bytes; an id and its comma take 37).
IDS_PER_NOTICE = 200


def announce_finished(session: Session, case_ids: Iterable[uuid.UUID]) -> None:
    """Announce, when ``session``'s transaction commits, that these cases have reached their end."""
    ids = [str(case_id) for case_id in case_ids]
    for start in range(0, len(ids), IDS_PER_NOTICE):
        payload = ",".join(ids[start : start + IDS_PER_NOTICE])
        # with the transaction's next statement, or at its commit (core.deferred): case ids only, no PHI
        deferred.defer(session, "SELECT pg_notify(%(channel)s, %(payload)s)", {"channel": CHANNEL, "payload": payload})


def parse(payload: str) -> list[uuid.UUID]:
    """The case ids of one notification (malformed parts are skipped)."""
    found = []
    for part in payload.split(","):
        try:
            found.append(uuid.UUID(part))
        except ValueError:
            continue
    return found


def announce_keys_changed(session: Session) -> None:
    """Announce, when ``session``'s transaction commits, that a key was revoked or a clinic
    (de)activated: every API process forgets the keys it has verified. The Session notes it too
    (:func:`keys_changed`), so that the process that commits it need not wait for the notification."""
    session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": KEYS_CHANNEL})
    session.info[_KEYS_CHANGED] = True


def keys_changed(session: Session) -> bool:
    """Whether ``session`` announced a change to the valid keys since this was last asked (call it
    once its transaction has committed)."""
    return bool(session.info.pop(_KEYS_CHANGED, False))


_KEYS_CHANGED = "dermq.keys_changed"
