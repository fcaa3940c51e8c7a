"""Companion messages: skipped in the worker's main process, before they reach a child.

Every case has its own ``classify`` message, and a dynamic batch (:mod:`worker.batching`) claims up
to ``batch_max_size`` queued cases at once, so under load most messages arrive for a case that an
earlier batch already took. Each such message used to travel the whole way for nothing: received
and dispatched by the main process, handed to a child through its pipe, traced, announced to
Flower three times, and answered by a database read that found the case taken. Profiled under
``python -m bench.load``, the main process took a quarter of the worker's samples and those reads
another 5%.

A batch now marks the companions it claimed in Redis (``dermq:claimed:<case id>``, no PHI: the
case id is what the message itself carries), once its claim has committed. The classify task's
execution strategy (:func:`skip_claimed`) looks for that mark when a message arrives and, if it
is there, acknowledges the message at once. The mark is a hint, never the truth:

- it lives :func:`mark_seconds`: long enough for the companions' messages to come out of a queue
  under load, and shorter than the sweeper's waits, so that a message the sweeper sends (for a
  queued case left without one, after ``requeue_grace_seconds``; for a running case whose worker
  died, after ``task_time_limit``) never finds a mark;
- a batch that stops puts its other cases back in the queue, each with a new message, and clears
  their marks (:func:`forget`); if that fails, the sweeper, which republishes a queued case that
  has no message, sends them again. No accepted case is lost to a mark;
- a retry's message (``requeue_attempt``) is never skipped, and when Redis does not answer the
  message goes its usual way (the child finds the case taken, as before).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from celery.worker.strategy import default

from core.config import Settings

log = logging.getLogger("dermq.worker.companions")

#: The longest a companion's mark lives: under load its message leaves the queue within a second or two.
MARK_SECONDS = 30.0
_PREFIX = "dermq:claimed:"

_clients: dict[str, redis.Redis] = {}


def client(redis_url: str) -> redis.Redis:
    """This process's connection for the marks (short timeouts: a mark is never worth a wait)."""
    found = _clients.get(redis_url)
    if found is None:
        found = _clients[redis_url] = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    return found


def mark_seconds(settings: Settings) -> float:
    """How long a mark lives: ``MARK_SECONDS``, or half the sweeper's shorter wait if that is less."""
    return min(MARK_SECONDS, settings.requeue_grace_seconds / 2, settings.task_time_limit / 2)


def key(case_id: uuid.UUID | str) -> str:
    return f"{_PREFIX}{case_id}"


def mark(settings: Settings, case_ids: Iterable[uuid.UUID]) -> None:
    """Mark ``case_ids`` as claimed by a batch, for :func:`mark_seconds` (after the claim committed);
    best effort."""
    ids = list(case_ids)
    milliseconds = int(mark_seconds(settings) * 1000)
    if not ids or milliseconds <= 0:
        return
    try:
        pipe = client(settings.redis_url).pipeline(transaction=False)
        for case_id in ids:
            pipe.set(key(case_id), b"1", px=milliseconds)
        pipe.execute()
    except redis.RedisError as exc:
        log.info("companions not marked; their messages will find them taken", extra={"error": type(exc).__name__})


def forget(settings: Settings, case_ids: Iterable[uuid.UUID]) -> None:
    """Clear the marks of cases put back in the queue; best effort (the sweeper covers a miss)."""
    ids = list(case_ids)
    if not ids:
        return
    try:
        client(settings.redis_url).delete(*(key(i) for i in ids))
    except redis.RedisError as exc:
        log.warning(
            "claim marks not cleared; the sweeper will send those cases again", extra={"error": type(exc).__name__}
        )


def claimed(connection: redis.Redis, case_id: str) -> bool:
    """Whether a batch marked ``case_id`` (False when Redis does not answer: the message goes its way)."""
    try:
        return bool(connection.exists(key(case_id)))
    except redis.RedisError:
        return False


def _plain_case_id(message: Any) -> str | None:
    """The case id of a first-try classify message (one argument, no keyword arguments), else None."""
    try:
        payload = message.payload
    except Exception:  # a body that does not decode: the default handler reports it
        return None
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return None
    args, kwargs = payload[0], payload[1]
    if kwargs or not isinstance(args, (list, tuple)) or len(args) != 1 or not isinstance(args[0], str):
        return None
    return args[0]


def skip_claimed(task: Any, app: Any, consumer: Any, **options: Any) -> Any:
    """Celery execution strategy of the classify task: Celery's own, except that a message whose
    case a batch has marked is acknowledged and dropped here, in the main process."""
    handle = default(task, app, consumer, **options)
    connection = client(app.dermq_settings.redis_url)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        case_id = _plain_case_id(message)
        if case_id is not None and claimed(connection, case_id):
            message.ack()
            return None
        return handle(message, body, ack, reject, callbacks, **kwargs)

    return on_message
