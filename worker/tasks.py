"""Celery tasks: ``classify(case_id)``, the recovery ``sweep``, completion ``callback`` delivery, the
retention ``purge`` and the periodic drift and audit-chain checks.

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

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from core import callbacks, case_states, recovery, retention
from core.config import Settings
from core.crypto import Keyring, KeyringSource
from core.db import session_scope
from core.logs import case_id_var
from core.models import Case
from core.publisher import make_publisher, publish_callback
from core.queueing import (
    AUDIT_CHECK_KEY,
    TASK_AUDIT_CHECK,
    TASK_CALLBACK,
    TASK_CLASSIFY,
    TASK_DRIFT,
    TASK_PURGE,
    TASK_SWEEP,
)
from ml.images import DecodedImage, InvalidImage, decode
from worker import faults, results, runtime
from worker.celery_app import app

if TYPE_CHECKING:
    from PIL import Image

    from ml.predictor import Analysis, Predictor

log = logging.getLogger("dermq.worker")

#: Transient failures worth retrying with backoff; anything else fails the case for good.
TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, ConnectionError)
MAX_RETRIES = 5


_keyrings: dict[str, KeyringSource] = {}


def settings() -> Settings:
    return app.conf.dermq_settings


def keyring(config: Settings) -> Keyring:
    """The keyring for these settings (re-read when the key file changes: rotation)."""
    cache_key = f"{config.key_file}|{config.keys_json is not None}"
    if cache_key not in _keyrings:
        _keyrings[cache_key] = KeyringSource(config)
    return _keyrings[cache_key].get()


def _metric(name: str, *args: Any) -> None:
    """Call ``worker.metrics.<name>`` where metrics exist (worker processes), else nothing."""
    metrics = runtime.worker_metrics()
    if metrics is not None:
        getattr(metrics, name)(*args)


@dataclass
class Progress:
    """How far one run got: the error handlers of ``classify`` need the attempt it claimed."""

    attempt: int | None = None


def _ended(config: Settings, case_id: uuid.UUID, transition: Callable[[Session], bool]) -> bool:
    """Run a terminal transition in its own transaction together with the case's callback outbox row,
    and publish the callback once that committed."""
    with session_scope(config) as session:
        ended = transition(session)
        notify = ended and callbacks.note_finished(session, case_id)
    if notify:
        publish_callback(app, case_id)
    return ended


def _model_error(exc: BaseException, doing: str) -> str:
    """The message stored with a ``model_error`` failure: what failed and the error's type, no details."""
    return f"the worker failed while {doing} ({type(exc).__name__}); the case can be submitted again"


def _fail(config: Settings, case_id: uuid.UUID, attempt: int | None, code: str, message: str) -> str:
    """Fail the case, fenced by ``attempt`` (None: whatever attempt holds it, when the claim's is unknown)."""
    _ended(
        config,
        case_id,
        lambda session: case_states.fail_case(session, case_id=case_id, attempt=attempt, code=code, message=message),
    )
    log.info("case failed", extra={"event": "case_failed", "code": code, "attempt": attempt})
    return "failed"


def _classify_image(
    config: Settings, predictor: Predictor, image: Image.Image, attempt: int
) -> tuple[Analysis, Predictor]:
    """Inference on the primary predictor; when its GPU runs out of memory, free the cache and run this
    case on a CPU predictor (the CUDA one stays for the next cases). Returns the analysis and the
    predictor that made it."""
    import torch

    try:
        faults.before_inference(config, attempt)
        return predictor.classify(image), predictor
    except torch.OutOfMemoryError:
        runtime.free_device_memory(predictor)
        fallback = runtime.get_cpu_predictor(config, predictor)
        log.warning(
            "out of GPU memory; running this case on the CPU",
            extra={"event": "oom_fallback", "device": str(fallback.device), "attempt": attempt},
        )
        return fallback.classify(image), fallback


def _decode_claimed(config: Settings, case_id: uuid.UUID, attempt: int, data: bytes) -> DecodedImage | str:
    """The image of a case this worker has just claimed, decoded; or, when the case is past its attempt
    limit or its image does not decode, the outcome of failing it."""
    if attempt > config.max_attempts:
        return _fail(config, case_id, attempt, "attempts_exhausted", f"gave up after {config.max_attempts} attempts")
    try:
        return decode(data, config.image_limits(), reduce_to=config.overlay_max_side)
    except InvalidImage as exc:
        return _fail(config, case_id, attempt, "invalid_image", exc.message)


def _with_images(config: Settings, claimed: Sequence[Case]) -> list[tuple[uuid.UUID, int, datetime, bytes]]:
    """(id, attempt, created_at, decrypted image) of each claimed case, read in a transaction of its
    own once the claim has committed (the claim's audit events hold the chain's lock until then)."""
    if not claimed:
        return []
    with session_scope(config) as session:
        images = case_states.load_images(session, keyring=keyring(config), case_ids=[c.id for c in claimed])
    return [(c.id, c.attempts, c.created_at, images[c.id]) for c in claimed]


def run_classification(config: Settings, case_id: uuid.UUID, progress: Progress | None = None) -> str:
    """Claim, classify, explain and store one case. Returns what happened, for logs and tests."""
    progress = progress if progress is not None else Progress()
    started = time.perf_counter()
    with session_scope(config) as session:
        case = case_states.claim_case(session, case_id)
        if case is None:
            log.info("case not claimable (taken, finished or purged); nothing to do", extra={"event": "skip"})
            return "skipped"
        attempt, created_at = case.attempts, case.created_at
    progress.attempt = attempt
    with session_scope(config) as session:  # after the claim's commit: its audit event held the chain's lock
        data = case_states.load_image(session, keyring=keyring(config), case_id=case_id)
    timings: dict[str, float] = {"queue_wait": (datetime.now(UTC) - created_at).total_seconds()}
    claimed = time.perf_counter()
    timings["claim_and_decrypt"] = claimed - started
    decoded = _decode_claimed(config, case_id, attempt, data)
    del data
    if isinstance(decoded, str):
        return decoded
    image = decoded.image
    timings["decode"] = time.perf_counter() - claimed

    try:
        predictor = runtime.get_predictor(config)
    except runtime.ModelUnavailable as exc:
        return _fail(config, case_id, attempt, "model_error", f"the model could not be loaded: {exc}")
    inference_started = time.perf_counter()
    analysis, predictor = _classify_image(config, predictor, image, attempt)
    timings["inference"] = time.perf_counter() - inference_started

    completion = results.completion(config, case_id, attempt, decoded, analysis, predictor, timings, started)
    return _store(config, [completion])[case_id]


def _store(config: Settings, completions: Sequence[case_states.Completion]) -> dict[uuid.UUID, str]:
    """Results, heat maps, audit events and callback outbox rows of ``completions`` in one transaction
    (a fixed number of statements however many), then the callbacks; returns each case's outcome.

    If a batch's transaction fails for anything but a transient error, each case is stored on its
    own instead, so that one case the database refuses fails alone rather than its whole batch,
    again and again."""
    try:
        with session_scope(config) as session:
            stored = case_states.complete_cases(session, keyring=keyring(config), completions=completions)
            notify = callbacks.note_finished_many(session, [c.case_id for c in completions if c.case_id in stored])
    except Exception as exc:
        _one_by_one_or_raise(exc, len(completions), "batch_store_failed", "storing a batch failed")
        return _store_one_by_one(config, completions)
    for case_id in notify:
        publish_callback(app, case_id)
    outcomes: dict[uuid.UUID, str] = {}
    for completion in completions:
        token = case_id_var.set(str(completion.case_id))
        try:
            if completion.case_id not in stored:
                log.warning(
                    "case was taken over or purged while running; result discarded", extra={"event": "superseded"}
                )
                outcomes[completion.case_id] = "superseded"
                continue
            result = completion.result
            _metric("record_result", result, result["timings"])
            log.info(
                "case classified",
                extra={
                    "event": "case_succeeded",
                    "attempt": completion.attempt,
                    "outcome": result.get("outcome", "diagnosis"),
                    "model_id": result["model_id"],
                    "device": result["device"],
                    "duration_ms": round(result["timings"]["total"] * 1000, 1),
                },
            )
            outcomes[completion.case_id] = "succeeded"
        finally:
            case_id_var.reset(token)
    _metric("record_gpu_memory")
    return outcomes


def _one_by_one_or_raise(exc: Exception, count: int, event: str, what: str) -> None:
    """Re-raise ``exc`` unless it stopped a batch of ``count`` cases for a reason other than a transient
    one; then log that the batch's cases will be handled one by one (so that the case at fault fails
    alone), and return."""
    if count < 2 or _transient(exc):
        raise exc
    log.warning(
        f"{what}; handling its cases one by one",
        extra={"event": event, "error": type(exc).__name__, "count": count},
    )


def _store_one_by_one(config: Settings, completions: Sequence[case_states.Completion]) -> dict[uuid.UUID, str]:
    """:func:`_store` for each completion alone; a case whose result cannot be stored fails."""
    outcomes: dict[uuid.UUID, str] = {}
    for completion in completions:
        try:
            outcomes |= _store(config, [completion])
        except Exception as exc:
            if _transient(exc):
                raise
            token = case_id_var.set(str(completion.case_id))
            try:
                log.exception("storing a result failed", extra={"event": "store_error", "error": type(exc).__name__})
                outcomes[completion.case_id] = _fail(
                    config,
                    completion.case_id,
                    completion.attempt,
                    "model_error",
                    _model_error(exc, "storing the result"),
                )
            finally:
                case_id_var.reset(token)
    return outcomes


def batching_enabled(config: Settings) -> bool:
    """Whether this worker claims and runs queued cases in batches (``DERMQ_BATCHING``; auto: yes).

    On a GPU one batched pass costs about one image's. On the CPU a pass costs about the sum of its
    images, but a batch is claimed, audited and stored in a fixed number of statements and one
    commit per transaction instead of about a dozen statements and two commits per case, which is
    the larger share of a case on a CPU worker: ``python -m bench.pipeline`` measured 1.5x the
    throughput draining a backlog. An idle queue gives batches of one, with no wait on the CPU."""
    return config.batching != "off" and config.batch_max_size > 1


def dispatch(config: Settings, case_id: uuid.UUID, progress: Progress) -> str:
    """One case, or a dynamic batch starting with it when batching is on for this worker."""
    if batching_enabled(config):
        try:
            runtime.get_predictor(config)  # before claiming: cases wait in the queue, not claimed, for the load
        except runtime.ModelUnavailable:
            return run_classification(config, case_id, progress)  # fails the case with model_error
        return run_batch(config, case_id, progress)
    return run_classification(config, case_id, progress)


def run_batch(config: Settings, case_id: uuid.UUID, progress: Progress | None = None) -> str:
    """Claim this case and up to ``batch_max_size - 1`` more queued ones in one statement, classify
    them in one forward pass, explain each, and store them all in one transaction. Returns this
    case's outcome; the other cases' messages find them taken and do nothing. If the batch stops
    with an error, the other cases it still holds go back to the queue (this one is the caller's)."""
    progress = progress if progress is not None else Progress()
    started = time.perf_counter()
    predictor = runtime.get_predictor(config)
    with session_scope(config) as session:
        claimed = case_states.claim_batch(session, case_id, limit=config.batch_max_size)
    if not claimed:
        log.info("case not claimable (taken, finished or purged); nothing to do", extra={"event": "skip"})
        return "skipped"
    progress.attempt = claimed[0].attempts
    outcomes: dict[uuid.UUID, str] = {}
    try:
        items = _with_images(config, claimed)
        if len(items) < config.batch_max_size and config.batch_max_wait_ms > 0 and predictor.device.type == "cuda":
            time.sleep(config.batch_max_wait_ms / 1000)  # a fuller batch is worth this much waiting on a GPU
            with session_scope(config) as session:
                more = case_states.claim_queued(session, limit=config.batch_max_size - len(items))
            claimed += more
            items += _with_images(config, more)
        _run_claimed_batch(config, predictor, items, started, outcomes)
    except BaseException:
        _requeue_unfinished(config, [(c.id, c.attempts) for c in claimed if c.id != case_id and c.id not in outcomes])
        raise
    log.info("batch classified", extra={"event": "batch", "count": len(items)})
    for item_id, outcome in outcomes.items():
        if item_id != case_id:
            _metric("record_outcome", outcome)
    return outcomes[case_id]


def _run_claimed_batch(
    config: Settings,
    predictor: Predictor,
    items: list[tuple[uuid.UUID, int, datetime, bytes]],
    started: float,
    outcomes: dict[uuid.UUID, str],
) -> None:
    """Decode, classify, explain and store claimed cases, writing each one's outcome into ``outcomes``
    as soon as it is final (so that a failure part-way knows which cases are still held)."""
    claimed_at = time.perf_counter()
    ready: list[tuple[uuid.UUID, int, Any, dict[str, float]]] = []
    for item_id, attempt, created_at, data in items:
        timings = {
            "queue_wait": (datetime.now(UTC) - created_at).total_seconds(),
            "claim_and_decrypt": claimed_at - started,
            "batch_size": float(len(items)),
        }
        token = case_id_var.set(str(item_id))
        try:
            decoded = _decode_claimed(config, item_id, attempt, data)
        finally:
            case_id_var.reset(token)
        if isinstance(decoded, str):
            outcomes[item_id] = decoded
            continue
        timings["decode"] = time.perf_counter() - claimed_at
        ready.append((item_id, attempt, decoded, timings))
    if not ready:
        return
    inference_started = time.perf_counter()
    try:
        analyses = _classify_batch(config, predictor, [decoded.image for _, _, decoded, _ in ready], ready[0][1])
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        _one_by_one_or_raise(exc, len(ready), "batch_classify_failed", "a batch failed to classify")
        ready, analyses = _classify_one_by_one(config, predictor, ready, outcomes)
        if not ready:
            return
    inference = (time.perf_counter() - inference_started) / len(ready)
    completions = []
    for (item_id, attempt, decoded, timings), (analysis, used) in zip(ready, analyses, strict=True):
        timings["inference"] = inference
        token = case_id_var.set(str(item_id))
        try:
            completions.append(results.completion(config, item_id, attempt, decoded, analysis, used, timings, started))
        finally:
            case_id_var.reset(token)
    outcomes.update(_store(config, completions))


def _classify_one_by_one(
    config: Settings,
    predictor: Predictor,
    ready: list[tuple[uuid.UUID, int, Any, dict[str, float]]],
    outcomes: dict[uuid.UUID, str],
) -> tuple[list[tuple[uuid.UUID, int, Any, dict[str, float]]], list[tuple[Analysis, Predictor]]]:
    """Classify a failed batch's cases each alone, so that a case that breaks the model fails by itself
    instead of taking its batch (and, requeued, the next one) with it. Returns the cases that
    classified and their analyses; the others are failed and their outcomes written."""
    done, analyses = [], []
    for item in ready:
        item_id, attempt = item[0], item[1]
        token = case_id_var.set(str(item_id))
        try:
            analyses.append(_classify_image(config, predictor, item[2].image, attempt))
            done.append(item)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            if _transient(exc):
                raise
            log.exception("classification failed", extra={"event": "model_error", "error": type(exc).__name__})
            outcomes[item_id] = _fail(
                config,
                item_id,
                attempt,
                "model_error",
                _model_error(exc, "classifying"),
            )
        finally:
            case_id_var.reset(token)
    return done, analyses


def _requeue_unfinished(config: Settings, held: list[tuple[uuid.UUID, int]]) -> None:
    """Put the cases a failed batch still holds back in the queue (fenced by their attempts); if the
    database does not answer, the sweeper will (they stay ``running`` until then)."""
    if not held:
        return
    try:
        with session_scope(config) as session:
            for item_id, attempt in held:
                case_states.requeue_case(session, item_id, attempt=attempt, reason="batch_interrupted")
        log.warning(
            "batch stopped; its other cases went back to the queue",
            extra={"event": "batch_requeued", "count": len(held)},
        )
    except Exception as exc:
        log.warning(
            "batch stopped and its other cases could not be requeued; the sweeper will",
            extra={"event": "requeue_failed", "error": type(exc).__name__, "count": len(held)},
        )


def _classify_batch(
    config: Settings, predictor: Predictor, images: list[Any], attempt: int
) -> list[tuple[Analysis, Predictor]]:
    """One forward pass for the batch; out of GPU memory, each image alone on the CPU instead.
    ``attempt``: the lead case's, for fault injection."""
    import torch

    try:
        faults.before_inference(config, attempt)
        return [(analysis, predictor) for analysis in predictor.classify_many(images)]
    except torch.OutOfMemoryError:
        runtime.free_device_memory(predictor)
        fallback = runtime.get_cpu_predictor(config, predictor)
        log.warning(
            "out of GPU memory for a batch; running it on the CPU image by image",
            extra={"event": "oom_fallback", "count": len(images)},
        )
        return [(fallback.classify(image), fallback) for image in images]


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


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError)
    return isinstance(exc, TRANSIENT)


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


@app.task(name=TASK_AUDIT_CHECK)
def audit_check() -> dict[str, object]:
    """Verify the audit chain incrementally (from the last verified row) and publish the outcome."""
    from core import audit

    config = settings()
    client = _redis_client(config)
    previous = json.loads(client.get(AUDIT_CHECK_KEY) or "{}")
    start = (previous["last_id"], previous["last_hash"]) if previous.get("ok") and previous.get("last_id") else None
    with session_scope(config) as session:
        report = audit.verify_chain(session, start_after=start)
    state = {
        "ok": report.ok,
        "first_bad_id": report.first_bad_id,
        "reason": report.reason,
        "last_id": report.last_id if report.ok else previous.get("last_id"),
        "last_hash": report.last_hash if report.ok else previous.get("last_hash"),
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if report.ok and report.last_id is None:  # nothing new since the last check
        state["last_id"], state["last_hash"] = previous.get("last_id"), previous.get("last_hash")
    client.set(AUDIT_CHECK_KEY, json.dumps(state))
    if not report.ok:
        log.error("audit chain broken", extra={"event": "audit_chain_broken"})
    return state
