"""When a pending completion callback may be attempted: the limit per clinic on attempts under way,
retries not before their backoff, and the turn handed to a clinic's oldest waiting callback.

- **A limit per clinic.** At most ``callback_clinic_concurrency`` attempts go to one clinic's receiver
  at once, over every callback worker (:func:`attempts_under_way`, counted when an attempt leases its
  delivery, :func:`core.callback_attempts.lease`): one clinic whose receiver answers slowly, or whose
  cases finish in a burst, holds no more of the callback workers' threads than that, and other
  clinics' callbacks go out meanwhile. Its further callbacks are :class:`Busy`: their messages come
  back later (:func:`turn_seconds`), nothing counted.
- **Turns handed on.** An attempt that ends hands its turn to the clinic's oldest callback waiting
  for one (:func:`next_waiting`), whose message is sent again at once: the clinic's callbacks go out
  as fast as its receiver answers, and the oldest waiting gets each turn that ends, unless a newer
  one's message comes first; the waiting ones' own messages come back ever more rarely (a safety
  net, for a turn freed by a lease that ran out).
- **Retries when due.** An attempt that got no good answer stamps its retry's time on the row
  (``next_attempt_at``, the database's clock); a retry's message names the attempt it follows
  (``after``). A copy of that message (Redis hands a message out again when it stays unacknowledged
  past the visibility timeout, as a due retry waiting for a busy worker's thread can) finds the
  attempt already made and does nothing, and locks nothing; the message itself, if a host's clock
  sends it early, waits out the rest (:class:`NotDue`).
- **A row held, looked at again.** A callback's own message that finds its row locked by another
  transaction (a turn being handed to it, a copy of its message leasing it, the sweeper: all short)
  looks again a second later, then after ever longer waits (:func:`held_seconds`). A row held for
  minutes is held by something else (a stuck transaction, a session outside dermq): after
  ``callback_held_looks`` looks the message ends, and the delivery, still pending and untouched, is
  the sweeper's (:mod:`core.recovery` sends it again once its message is gone and the row is free).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from core.config import CALLBACK_LONGEST_TURN_SECONDS, Settings
from core.models import CallbackDelivery, CallbackStatus


@dataclass(frozen=True, slots=True)
class Busy:
    """The clinic's receiver already has its fill of attempts under way: no attempt is counted, and
    the callback waits its turn."""

    in_flight: int
    #: the callback's attempts so far
    attempts: int


@dataclass(frozen=True, slots=True)
class NotDue:
    """The retry this message brings is due in ``seconds`` (by the database's clock)."""

    seconds: float


#: first key of the advisory locks that take a clinic's callback leases one at a time ("dqcb")
CLINIC_LOCK = 0x64716362
_HOLD_CLINIC = text("SELECT pg_advisory_xact_lock(:cls, :key)")


def _under_way(session: Session, clinic_id: uuid.UUID) -> int:
    count = session.scalar(
        select(func.count())
        .select_from(CallbackDelivery)
        .where(
            CallbackDelivery.clinic_id == clinic_id,
            CallbackDelivery.status == CallbackStatus.PENDING.value,
            CallbackDelivery.leased_until.is_not(None),
            CallbackDelivery.leased_until > func.now(),  # the database's clock, as the leases are stamped
        )
    )
    return count or 0


def attempts_under_way(session: Session, clinic_id: uuid.UUID, limit: int) -> int:
    """How many of the clinic's callbacks a worker holds a live lease on. Below ``limit`` the count is
    taken again under a lock on the clinic, held until this transaction ends: two workers leasing its
    callbacks at once count one after the other, so neither passes the limit on a count the other is
    about to change. At the limit already, no lock is taken (a clinic with many callbacks waiting
    does not queue them all on its lock)."""
    if _under_way(session, clinic_id) >= limit:
        return limit
    session.execute(_HOLD_CLINIC, {"cls": CLINIC_LOCK, "key": int.from_bytes(clinic_id.bytes[:4], "big", signed=True)})
    return _under_way(session, clinic_id)


def next_waiting(session: Session, clinic_id: uuid.UUID) -> uuid.UUID | None:
    """The clinic's oldest pending callback that no worker holds and whose retry, if any, is due:
    the one to hand a turn that has just ended. Locked until this transaction ends, so that two
    attempts ending at once hand their turns to two callbacks."""
    return session.scalar(
        select(CallbackDelivery.case_id)
        .where(
            CallbackDelivery.clinic_id == clinic_id,
            CallbackDelivery.status == CallbackStatus.PENDING.value,
            or_(CallbackDelivery.leased_until.is_(None), CallbackDelivery.leased_until < func.now()),
            or_(CallbackDelivery.next_attempt_at.is_(None), CallbackDelivery.next_attempt_at <= func.now()),
        )
        .order_by(CallbackDelivery.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )


#: the wait before a callback's message looks again at its row, held by another transaction, the first time
HELD_FIRST_LOOK_SECONDS = 1.0


def held_seconds(settings: Settings, looks: int) -> float | None:
    """When a callback's own message that has found its row held by another transaction ``looks``
    times in a row looks again: a second after the first, doubling each time, at most
    :data:`~core.config.CALLBACK_LONGEST_TURN_SECONDS` or the longest backoff, whichever is shorter
    (within the broker's visibility timeout, as :func:`turn_seconds`). None once it has looked
    ``callback_held_looks`` times: the message ends, and the sweeper sends the delivery again."""
    if looks >= settings.callback_held_looks:
        return None
    delay = HELD_FIRST_LOOK_SECONDS * 2.0 ** min(max(0, looks - 1), 16)  # no float overflow
    return min(CALLBACK_LONGEST_TURN_SECONDS, settings.callback_backoff_max_seconds, delay)


def turn_seconds(settings: Settings, waited: int) -> float:
    """When a callback that has waited for a turn ``waited`` times before sends its message again:
    one callback timeout, doubling each time, jittered so that a
    clinic's waiting callbacks do not all come back at once, and at most
    :data:`~core.config.CALLBACK_LONGEST_TURN_SECONDS` or the longest backoff, whichever is shorter
    (which the settings keep within the broker's visibility timeout: a message held longer would be
    handed out twice). A turn that ends is handed over sooner."""
    doublings = min(max(0, waited), 16)  # a float power of two overflows past about a thousand
    delay = settings.callback_timeout_seconds * 2.0**doublings * (0.5 + random.random())  # noqa: S311 - jitter
    return min(CALLBACK_LONGEST_TURN_SECONDS, settings.callback_backoff_max_seconds, delay)
