"""Celery tasks: ``classify(case_id)``, the recovery ``sweep``, completion ``callback`` delivery, the
retention ``purge`` and the periodic drift check (the audit sealer and check: :mod:`worker.sealing`).

Tasks take ids, never payloads, and are idempotent: ``classify`` first claims the case
(``queued -> running``) and does nothing if it cannot, so a redelivered or duplicated message is
harmless. The claim commits before the work starts, and every later transition is fenced by the
attempt number the claim returned.

What can go wrong, and what then:

- the image is invalid: ``failed: invalid_image`` at once, never retried;
- a transient error (database connection lost, Redis hiccup): the case goes back to ``queued`` and
  the task retries with exponential backoff and jitter, at most ``MAX_RETRIES`` times (the retry
  puts the case back first if the database was down when it failed); after that the sweeper;
- the soft time limit: ``failed: timeout``; Grad-CAM past its own budget: a result without a heat map;
- the model's gate finds the image out of distribution (not a dermoscopy image it can judge): the case
  succeeds with an ``out_of_distribution`` result, no diagnosis and no heat map (:mod:`worker.results`);
- the hard time limit or a crash of the child: the case stays ``running``, its redelivered message
  is skipped, and the sweeper requeues it (or fails it once the attempts are spent);
- the GPU runs out of memory: the cache is freed and this case runs on the CPU (``results.device``);
- anything else: ``failed: model_error``.
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from core import callbacks, case_states, recovery, retention
from core.config import Settings
from core.db import session_scope
from core.logs import case_id_var
from core.publisher import make_publisher, publish_callback
from core.queueing import (
    TASK_CALLBACK,
    TASK_CLASSIFY,
    TASK_DRIFT,
    TASK_PURGE,
    TASK_SWEEP,
)
from worker import sealing  # noqa: F401  (registers the audit sealer and check tasks)
from worker.batching import dispatch
from worker.celery_app import app
from worker.pipeline import Progress, _fail, _metric, _model_error, _transient, keyring, settings

if TYPE_CHECKING:
    pass

log = logging.getLogger("dermq.worker")

MAX_RETRIES = 5


def retry_delay(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4, 8... (capped at 60) times a jitter in
    [0.5, 1.5), so that workers hit by one outage do not come back in step."""
    return min(60.0, 2.0**retries) * (0.5 + random.random())  # noqa: S311 - jitter, not cryptography


def _requeue(config: Settings, case_id: uuid.UUID, attempt: int) -> None:
    """Put the case back in the queue if ``attempt`` still holds it (fenced: a no-op otherwise)."""
    with session_scope(config) as session:
        case_states.requeue_case(session, case_id, attempt=attempt, reason="transient_error")


def _retry(task: Any, config: Settings, case_id: uuid.UUID, attempt: int | None, exc: Exception) -> Exception:
    if attempt is not None:
        try:
            _requeue(config, case_id, attempt)  # at once if the database answers; the retry repeats it
        except Exception as requeue_error:
            log.warning(
                "could not requeue after a transient error; the retry will",
                extra={"event": "requeue_failed", "error": type(requeue_error).__name__},
            )
    countdown = retry_delay(task.request.retries)
    log.warning(
        "transient error; retrying",
        extra={"event": "retry", "error": type(exc).__name__, "retry_in": round(countdown, 2), "attempt": attempt},
    )
    kwargs = {"requeue_attempt": attempt} if attempt is not None else {}
    retry: Exception = task.retry(exc=exc, countdown=countdown, kwargs=kwargs)
    return retry


@app.task(name=TASK_CLASSIFY, bind=True, max_retries=MAX_RETRIES)
def classify(self: Any, case_id: str, requeue_attempt: int | None = None) -> str:
    """Classify one case. ``requeue_attempt``: this is a retry after a transient error that hit that
    attempt, which must be put back in the queue (if it still holds the case) before claiming again."""
    config = settings()
    token = case_id_var.set(case_id)
    try:
        try:
            parsed = uuid.UUID(case_id)
        except (ValueError, TypeError):
            log.error("classify called with something that is not a case id", extra={"event": "bad_message"})
            return "ignored"
        progress = Progress()
        try:
            if requeue_attempt is not None:
                _requeue(config, parsed, requeue_attempt)
            outcome = dispatch(config, parsed, progress)
        except SoftTimeLimitExceeded:
            log.warning("case ran past its soft time limit", extra={"event": "soft_time_limit"})
            if progress.attempt is None:
                outcome = "skipped"  # stopped before its claim committed: still queued, for the sweeper
            else:
                outcome = _fail(
                    config,
                    parsed,
                    progress.attempt,
                    "timeout",
                    f"classification ran past its {config.task_soft_time_limit:g} s time limit; "
                    "submit the case again or contact support with the case id",
                )
        except Exception as exc:
            if _transient(exc):
                raise _retry(self, config, parsed, progress.attempt or requeue_attempt, exc) from None
            log.exception("classification failed", extra={"event": "model_error", "error": type(exc).__name__})
            outcome = _fail(
                config,
                parsed,
                progress.attempt,
                "model_error",
                _model_error(exc, "classifying"),
            )
        _metric("record_outcome", outcome)
        return outcome
    finally:
        case_id_var.reset(token)


@app.task(name=TASK_CALLBACK, bind=True, max_retries=None)
def deliver_callback(self: Any, case_id: str) -> str:
    """One attempt at a finished case's completion callback; retried with backoff until delivered or
    ``callback_max_attempts`` is reached (counted in the outbox row, not here)."""
    config = settings()
    try:
        parsed = uuid.UUID(case_id)
    except (ValueError, TypeError):
        return "ignored"
    try:
        with session_scope(config) as session:
            delivery = callbacks.deliver(session, settings=config, keyring=keyring(config), case_id=parsed)
    except Exception as exc:
        if not _transient(exc) or self.request.retries >= MAX_RETRIES:
            raise  # the row stays pending: the sweeper publishes it again later
        raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from None
    log.info(
        "callback attempt",
        extra={
            "event": "callback",
            "case_id": case_id,
            "outcome": delivery.outcome,
            "attempt": delivery.attempt,
            "status_code": delivery.http_status,
        },
    )
    if delivery.outcome == "retry":
        raise self.retry(countdown=callbacks.backoff_seconds(config, delivery.attempt))
    return delivery.outcome


_publisher: Celery | None = None
_redis: redis.Redis | None = None


def _redis_client(config: Settings) -> redis.Redis:
    """This process's Redis connection for the periodic tasks, made on first use."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(config.redis_url, socket_connect_timeout=2, socket_timeout=5)
    return _redis


def sweep_once(config: Settings, publisher: Celery, broker: redis.Redis | None) -> dict[str, object]:
    """One recovery sweep in its own transaction, then the callbacks of the cases it failed."""
    with session_scope(config) as session:
        report = recovery.sweep(session, config, publisher, broker)
    for case_id in report.callbacks:
        publish_callback(publisher, case_id)
    return report.to_dict()


@app.task(name=TASK_SWEEP)
def sweep() -> dict[str, object]:
    global _publisher
    config = settings()
    if _publisher is None:
        _publisher = make_publisher(config)
    return sweep_once(config, _publisher, _redis_client(config))


@app.task(name=TASK_PURGE)
def purge() -> dict[str, object]:
    config = settings()
    with session_scope(config) as session:
        return retention.purge_expired(session, config).to_dict()


@app.task(name=TASK_DRIFT)
def drift_report() -> dict[str, object]:
    """The drift figures of the last 24 hours, published to Redis for the API's metrics."""
    from worker import drift

    config = settings()
    client = _redis_client(config)
    with session_scope(config) as session:
        report = drift.day_report(session, config)
    drift.publish(client, report)
    if report["drifted"]:
        log.warning("input or prediction drift", extra={"event": "drift", "count": report["n"]})
    return report
