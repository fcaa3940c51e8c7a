"""The retry policy of ``classify``: which errors are transient, how long to wait before the next try,
and putting the case back in the queue before retrying.

A transient error (database connection lost, Redis hiccup) puts the case back to ``queued`` and the
task retries with exponential backoff and jitter, at most :data:`MAX_RETRIES` times; the retry puts
the case back first if the database was down when it failed. After that the sweeper takes over.
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

import redis
from sqlalchemy.exc import DBAPIError, OperationalError

from core import case_states
from core.config import Settings
from core.db import session_scope
from core.errors import KeyringError
from worker.withheld import withheld

log = logging.getLogger("dermq.worker")

MAX_RETRIES = 5

#: Transient failures worth retrying with backoff; anything else fails the case for good. A
#: ``MemoryError`` is the worker's memory, not the case's fault; each retry claims the case again, so
#: an image that never fits still stops at ``max_attempts``. A ``KeyringError`` or ``OSError`` is the
#: worker's key file or volume (unreadable, exposed, unmounted): failing would fail every case the
#: worker takes until an operator mends it; retried, then published again by the sweeper, they wait.
TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError, MemoryError, KeyringError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: a lost database connection, an unreachable Redis, memory
    this process could not allocate, or keys it could not load."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError)
    return isinstance(exc, TRANSIENT)


def retry_delay(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4, 8... (capped at 60) times a jitter in
    [0.5, 1.5), so that workers hit by one outage do not come back in step."""
    return min(60.0, 2.0**retries) * (0.5 + random.random())  # noqa: S311 - jitter, not cryptography


def requeue(config: Settings, case_id: uuid.UUID, attempt: int, reason: str = "transient_error") -> None:
    """Put the case back in the queue if ``attempt`` still holds it (fenced: a no-op otherwise)."""
    with session_scope(config) as session:
        case_states.requeue_case(session, case_id, attempt=attempt, reason=reason)


def retry(task: Any, config: Settings, case_id: uuid.UUID, attempt: int | None, exc: Exception) -> Exception:
    """Put the case ``attempt`` holds back in the queue and return the Celery ``Retry`` to raise: the
    next try runs after :func:`retry_delay` and, first of all, requeues ``attempt`` again (in case the
    database was down just now). Past the task's retry limit, the :class:`WithheldError` to raise."""
    if attempt is not None:
        try:
            requeue(config, case_id, attempt)  # at once if the database answers; the retry repeats it
        except Exception as requeue_error:
            log.warning(
                "could not requeue after a transient error; the retry will",
                extra={"event": "requeue_failed", "error": type(requeue_error).__name__},
            )
    # Celery formats the exception a task ends with, and each one chained to it, into its task-retried
    # and task-failed events (and so Flower): raised from None by the caller, neither carries ``exc``.
    # Past the limit Celery would raise the withheld error *from* ``exc``: it is returned here instead.
    if task.max_retries is not None and task.request.retries >= task.max_retries:
        return withheld(exc)
    countdown = retry_delay(task.request.retries)
    log.warning(
        "transient error; retrying",
        extra={"event": "retry", "error": type(exc).__name__, "retry_in": round(countdown, 2), "attempt": attempt},
    )
    kwargs = {"requeue_attempt": attempt} if attempt is not None else {}
    error: Exception = task.retry(exc=withheld(exc), countdown=countdown, kwargs=kwargs, throw=False)
    return error
