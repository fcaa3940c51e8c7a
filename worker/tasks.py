"""Celery tasks: ``classify(case_id)``, the recovery ``sweep``, the retention ``purge``, the periodic
drift check and field-performance report (the audit sealer and check: :mod:`worker.sealing`;
completion ``callback`` delivery: :mod:`worker.callback_tasks`).
Each is a thin wrapper: the work is in :mod:`worker.pipeline` and :mod:`worker.batching`, the retry
policy in :mod:`worker.retries`.

Tasks take ids, never payloads, and are idempotent: ``classify`` first claims the case
(``queued -> running``) and does nothing if it cannot, so a redelivered or duplicated message is
harmless. The claim commits before the work starts, and every later transition is fenced by the
attempt number the claim returned.

What can go wrong, and what then:

- the image is invalid: ``failed: invalid_image`` at once, never retried;
- a transient error (database connection lost, Redis hiccup): the case goes back to ``queued`` and
  the task retries with exponential backoff and jitter, at most ``MAX_RETRIES`` times (the retry
  puts the case back first if the database was down when it failed); after that the sweeper
  (:mod:`worker.retries`). A claim that met a database error on every retry costs the case an attempt (else a
  statement timeout that recurs for one case would go round the retries and the sweeper for ever),
  and the last attempt fails it ``attempts_exhausted``;
- the soft time limit: ``failed: timeout`` (a batch's cases all go back to the queue, to run alone:
  :mod:`worker.batching`); Grad-CAM past its own budget: a result without a heat map;
- the model's gate finds the image out of distribution (not a dermoscopy image it can judge): the case
  succeeds with an ``out_of_distribution`` result, no diagnosis and no heat map (:mod:`worker.results`);
- the hard time limit or a crash of the child: the case stays ``running``, its redelivered message
  is skipped, and the sweeper requeues it (or fails it once the attempts are spent);
- the GPU runs out of memory: the cache is freed and this case runs on the CPU (``results.device``);
- the GPU fails (a CUDA error other than out of memory: the process's CUDA context is lost): the case
  goes back to the queue, its attempt counted, and the child exits for a new one (``runtime.end_child``);
- the process runs out of memory (``MemoryError``, in the decode too): a transient error, retried as
  above, each claim an attempt (never ``invalid_image``: the image is not at fault);
- anything else: ``failed: model_error``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Any, NoReturn

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError

from core import case_states, idempotency, outcomes, phi, recovery, results, retention
from core.config import Settings
from core.db import session_scope
from core.logs import case_id_var
from core.publisher import make_publisher
from core.queueing import (
    TASK_CLASSIFY,
    TASK_DRIFT,
    TASK_FIELD,
    TASK_PURGE,
    TASK_SWEEP,
)
from worker import (
    callback_tasks,  # noqa: F401  (registers the completion callback's task)
    retries,
    runtime,
    sealing,  # noqa: F401  (registers the audit sealer and check tasks)
)
from worker.batching import dispatch
from worker.celery_app import app
from worker.pipeline import Progress, _fail, _model_error, keyring, settings
from worker.retries import MAX_RETRIES

log = logging.getLogger("dermq.worker")


@app.task(name=TASK_CLASSIFY, bind=True, max_retries=MAX_RETRIES, Strategy="worker.companions:skip_claimed")
def classify(self: Any, case_id: str, requeue_attempt: int | None = None) -> str:
    """Classify one case. ``requeue_attempt``: this is a retry after a transient error that hit that
    attempt, which must be put back in the queue (if it still holds the case) before claiming again."""
    config = settings()
    try:
        parsed = uuid.UUID(case_id)
    except (ValueError, TypeError, AttributeError):  # logged without it: a message's argument is anybody's text
        log.error("classify called with something that is not a case id", extra={"event": "bad_message"})
        return "ignored"
    token = case_id_var.set(str(parsed))
    try:
        progress = Progress()
        try:
            if requeue_attempt is not None:
                retries.requeue(config, parsed, requeue_attempt)
            outcome = dispatch(config, parsed, progress)
        except SoftTimeLimitExceeded:
            log.warning("case ran past its soft time limit", extra={"event": "soft_time_limit"})
            if progress.requeued:
                outcome = "requeued"  # its batch ran out of time: it runs again, alone (worker.batching)
            elif progress.settled is not None:
                outcome = progress.settled  # its batch had failed it or put it back before it stopped
            elif progress.attempt is None:
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
            if runtime.device_failed(exc):
                # never returns; a case its batch settled is not this run's to put back
                _device_failed(config, parsed, None if progress.settled is not None else progress.attempt)
            if progress.settled is not None:
                # its batch failed it or put it back (its attempt given back: another worker's claim may
                # now hold the same number, which a fail or requeue fenced by it would hit), then stopped
                log.warning("its batch stopped", extra={"event": "batch_stopped", "error": type(exc).__name__})
                outcome = progress.settled
            elif not retries.is_transient(exc):
                log.exception("classification failed", extra={"event": "model_error", "error": type(exc).__name__})
                outcome = _fail(config, parsed, progress.attempt, "model_error", _model_error(exc, "classifying"))
            else:
                held = progress.attempt or requeue_attempt
                # a claim that met a database error on every retry costs the case an attempt, and its last
                # one fails it (a MemoryError loading the model, say, is not the case's to pay for)
                claim_failed = (  # this run's claim never committed (a retry's chain carries an attempt too)
                    progress.attempt is None and self.request.retries >= MAX_RETRIES and isinstance(exc, DBAPIError)
                )
                if not claim_failed or not _spend_failed_claim(config, parsed, exc):
                    raise retries.retry(self, config, parsed, held, exc) from None
                outcome = "failed"
        metrics = runtime.worker_metrics()
        if metrics is not None:
            metrics.record_outcome(outcome)
        return outcome
    finally:
        case_id_var.reset(token)


def _device_failed(config: Settings, case_id: uuid.UUID, attempt: int | None) -> NoReturn:
    """Put the case back in the queue (fenced by its attempt, which stays counted) and end this child:
    its GPU failed, and a case it took next would fail too (:func:`worker.runtime.device_failed`). A
    batch has put its other cases back already (:mod:`worker.batching`)."""
    if attempt is not None:
        try:
            retries.requeue(config, case_id, attempt, reason="device_failed")
        except Exception as exc:  # the sweeper requeues it once its time limit has passed
            log.warning("could not requeue the case", extra={"event": "requeue_failed", "error": type(exc).__name__})
    runtime.end_child()


def _spend_failed_claim(config: Settings, case_id: uuid.UUID, error: Exception) -> bool:
    """After the last retry of a case whose claim never committed: count the attempt those tries
    made (:func:`core.case_states.spend_failed_claim`) and, once the case's attempts are spent, fail
    it as the sweeper fails a case whose attempts all ran out. True when the case was failed; False
    when it stays queued for the sweeper to publish again (or could not be counted: the database is
    still away, which spends nothing)."""
    kind = type(error).__name__
    try:
        with session_scope(config) as session:
            attempts = case_states.spend_failed_claim(session, case_id, error=kind)
        log.warning("the case could not be claimed on any retry", extra={"event": "claim_failed", "attempt": attempts})
        if attempts is None or attempts < config.max_attempts:
            return False
        message = (
            f"none of {attempts} attempts could start: each met a database error ({kind}) claiming the case; "
            "submit it again, or contact support with the case id"
        )
        return _fail(config, case_id, None, "attempts_exhausted", message) == "failed"
    except Exception as exc:  # the retry's error is raised instead, its text withheld
        log.warning("could not count the failed claim", extra={"event": "claim_uncounted", "error": type(exc).__name__})
        return False


_publisher: Celery | None = None
_redis: redis.Redis | None = None


def _the_publisher(config: Settings) -> Celery:
    """This process's publisher for the periodic tasks and forwarded callbacks, made on first use."""
    global _publisher
    if _publisher is None:
        _publisher = make_publisher(config)
    return _publisher


def _redis_client(config: Settings) -> redis.Redis:
    """This process's Redis connection for the periodic tasks, made on first use."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(config.redis_url, socket_connect_timeout=2, socket_timeout=5)
    return _redis


def sweep_once(config: Settings, publisher: Celery, broker: redis.Redis | None) -> dict[str, object]:
    """Recovery sweeps, each in its own transaction (what one publishes is sent once it committed),
    until one leaves less than a batch behind or half the soft time limit has passed: after Redis lost
    its data, one batch a sweep republished about 1,000 queued cases a minute, fewer than the workers
    classify, and tens of thousands waited for half an hour."""
    budget_ends = time.monotonic() + config.task_soft_time_limit / 2
    done: Counter[str] = Counter()
    while True:
        with session_scope(config) as session:
            report = recovery.sweep(session, config, publisher, broker)
        recovery.log_report(report)
        metrics = runtime.worker_metrics()
        if metrics is not None and (report.requeued or report.failed):
            metrics.record_lost(len(report.requeued), len(report.failed))
        done.update({name: int(value) for name, value in report.to_dict().items()})
        if not report.full():
            break
        if time.monotonic() > budget_ends:  # the next sweep goes on; DermqQueueWaitHigh if it keeps happening
            log.warning("the sweep left work for its next run", extra={"event": "sweep_backlog"})
            break
    with session_scope(config) as session:  # client references and results stored before they were sealed
        sealed = phi.seal_plain_client_refs(session, keyring(config))
        sealed_results = results.seal_plain_results(session, keyring(config))  # a batch of each a sweep
        sealed_diagnoses = outcomes.seal_plain_diagnoses(session, keyring(config))
    with session_scope(config) as session:  # apart: a key stored meanwhile under the same digest fails only this
        keys_digested = idempotency.digest_plain_keys(session, keyring(config))
    return {
        **done,
        "broker_checked": bool(done["broker_checked"]),
        "client_refs_sealed": sealed,
        "results_sealed": sealed_results,
        "diagnoses_sealed": sealed_diagnoses,
        "idempotency_keys_digested": keys_digested,
    }


@app.task(name=TASK_SWEEP)
def sweep() -> dict[str, object]:
    config = settings()
    return sweep_once(config, _the_publisher(config), _redis_client(config))


@app.task(name=TASK_PURGE)
def purge() -> dict[str, object]:
    """Retention: crypto-shred expired cases, a batch per transaction, until none is left or half the
    task's soft time limit has passed (one batch a run purged 12,000 cases a day at most, fewer than
    one host classifies: the backlog, and the old backups it keeps readable, grew for ever); then
    destroy the keys of periods whose every case is purged and past retention plus the grace (no
    backup can decrypt them afterwards), drop the monthly field tally's months before its window, and
    delete the settled callback deliveries older than ``callback_history_days`` and the replaced
    callback secrets whose overlap has ended. A step that fails does not stop the others, nor a period
    whose key cannot be destroyed the other periods; each is counted in
    ``dermq_retention_step_failures_total`` as it fails, so a run that ends later without returning (its
    database lost, the time limit) has counted it too."""
    config = settings()
    metrics = runtime.worker_metrics()
    counted = None if metrics is None else lambda failure: metrics.record_retention_failure(failure.step)
    report = retention.run(config, until=time.monotonic() + config.task_soft_time_limit / 2, on_failure=counted)
    if report.backlog:  # the next run goes on; lower DERMQ_PURGE_INTERVAL_SECONDS if it keeps happening
        log.warning(
            "retention left expired cases for its next run", extra={"event": "purge_backlog", "count": report.purged}
        )
    return report.to_dict()


@app.task(name=TASK_DRIFT)
def drift_report() -> dict[str, object]:
    """The drift figures of the last 24 hours, published to Redis for the API's metrics."""
    from worker import drift

    config = settings()
    client = _redis_client(config)
    with session_scope(config) as session:
        report = drift.day_report(session, config, keyring=keyring(config))
    drift.publish(client, report)
    if report["drifted"]:
        log.warning("input or prediction drift", extra={"event": "drift", "count": report["n"]})
    return report


@app.task(name=TASK_FIELD)
def field_performance() -> dict[str, object]:
    """Sensitivity, PPV and referral sensitivity on confirmed outcomes, published to Redis for the
    API's ``dermq_field_*`` gauges (:mod:`worker.field`)."""
    from worker import field

    config = settings()
    with session_scope(config) as session:
        report = field.field_report(session, config)
    field.publish(_redis_client(config), report)
    for alert in report["alerts"]:
        log.warning(
            "melanoma sensitivity on confirmed cases is below the model card's floor",
            extra={
                "event": "field_performance",
                "model_id": alert["model_id"],
                "count": alert["confirmed_melanomas"],
                "window": alert["window"],
            },
        )
    return {"models": len(report["models"]), "alerts": len(report["alerts"])}
