"""Celery tasks: ``classify(case_id)``, the recovery ``sweep`` and the retention ``purge``.

Tasks take ids, never payloads, and are idempotent: ``classify`` first claims the case
(``queued -> running``) and does nothing if it cannot, so a redelivered or duplicated message is
harmless. The claim commits before the work starts, and every later transition is fenced by the
attempt number the claim returned.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from core import cases, recovery, retention
from core.config import Settings
from core.crypto import Keyring, KeyringSource
from core.db import session_scope
from core.logs import case_id_var
from core.publisher import make_publisher
from core.queueing import TASK_CLASSIFY, TASK_PURGE, TASK_SWEEP
from ml.images import ImageLimits, InvalidImage, decode
from worker import runtime
from worker.celery_app import app

log = logging.getLogger("dermq.worker")

#: Transient failures worth retrying with backoff; anything else fails the case for good.
TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, ConnectionError)
MAX_RETRIES = 5


class GradcamTimeout(Exception):
    """Grad-CAM ran past its own budget; the classification stands without a heat map."""


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`GradcamTimeout` in this block after ``seconds`` (SIGALRM; main thread only).

    Celery's prefork children run tasks on their main thread. Elsewhere (tests calling the task
    function directly from a thread) the block runs to completion and is judged afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        started = time.monotonic()
        yield
        if time.monotonic() - started > seconds:
            raise GradcamTimeout
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise GradcamTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_keyrings: dict[str, KeyringSource] = {}


def settings() -> Settings:
    return app.conf.dermq_settings  # type: ignore[no-any-return]


def keyring(config: Settings) -> Keyring:
    """The keyring for these settings (re-read when the key file changes: rotation)."""
    cache_key = f"{config.key_file}|{config.keys_json is not None}"
    if cache_key not in _keyrings:
        _keyrings[cache_key] = KeyringSource(config)
    return _keyrings[cache_key].get()


def image_limits(config: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=config.max_upload_bytes,
        max_side=config.max_image_side,
        max_pixels=config.max_image_pixels,
        min_side=config.min_image_side,
    )


def _fail(config: Settings, case_id: uuid.UUID, attempt: int, code: str, message: str) -> str:
    with session_scope(config) as session:
        cases.fail_case(session, case_id=case_id, attempt=attempt, code=code, message=message)
    log.info("case failed", extra={"event": "case_failed", "code": code, "attempt": attempt})
    return "failed"


def run_classification(config: Settings, case_id: uuid.UUID) -> str:
    """Claim, classify, explain and store one case. Returns what happened, for logs and tests."""
    started = time.perf_counter()
    with session_scope(config) as session:
        case = cases.claim_case(session, case_id)
        if case is None:
            log.info("case not claimable (taken, finished or purged); nothing to do", extra={"event": "skip"})
            return "skipped"
        attempt, created_at = case.attempts, case.created_at
        if attempt > config.max_attempts:
            cases.fail_case(
                session,
                case_id=case_id,
                attempt=attempt,
                code="attempts_exhausted",
                message=f"gave up after {config.max_attempts} attempts",
            )
            return "failed"
        data = cases.load_image(session, keyring=keyring(config), case_id=case_id)
    timings: dict[str, float] = {"queue_wait": (datetime.now(UTC) - created_at).total_seconds()}
    claimed = time.perf_counter()
    timings["claim_and_decrypt"] = claimed - started

    try:
        decoded = decode(data, image_limits(config), reduce_to=config.overlay_max_side)
    except InvalidImage as exc:
        return _fail(config, case_id, attempt, "invalid_image", exc.message)
    finally:
        del data
    image = decoded.image
    timings["decode"] = time.perf_counter() - claimed

    try:
        predictor = runtime.get_predictor(config)
    except runtime.ModelUnavailable as exc:
        return _fail(config, case_id, attempt, "model_error", f"the model could not be loaded: {exc}")
    inference_started = time.perf_counter()
    analysis = predictor.classify(image)
    timings["inference"] = time.perf_counter() - inference_started

    heatmap_png, gradcam_status, gradcam_class = None, "ok", analysis.prediction.label
    gradcam_started = time.perf_counter()
    try:
        with time_budget(config.gradcam_budget_seconds):
            explanation = predictor.explain_analysis(image, analysis)
        heatmap_png = explanation.overlay_png
    except GradcamTimeout:
        gradcam_status = "timeout"
        log.warning(
            "Grad-CAM ran past its budget; storing the result without a heat map",
            extra={"event": "gradcam_timeout", "seconds": config.gradcam_budget_seconds},
        )
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        gradcam_status = "error"
        log.warning(
            "Grad-CAM failed; storing the result without a heat map",
            extra={"event": "gradcam_error", "error": type(exc).__name__},
        )
    timings["gradcam"] = time.perf_counter() - gradcam_started

    prediction = analysis.prediction
    timings["total"] = time.perf_counter() - started
    result = {
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "confidence": prediction.confidence,
        "uncertainty": prediction.uncertainty,
        "referral": prediction.referral,
        "referral_reasons": list(prediction.referral_reasons),
        "gradcam_status": gradcam_status,
        "gradcam_class": gradcam_class if heatmap_png is not None else None,
        "model_id": predictor.info.model_id,
        "weights_sha256": predictor.info.weights_sha256,
        "device": str(predictor.device),
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }
    with session_scope(config) as session:
        stored = cases.complete_case(
            session, keyring=keyring(config), case_id=case_id, attempt=attempt, result=result, heatmap_png=heatmap_png
        )
    if not stored:
        log.warning("case was taken over or purged while running; result discarded", extra={"event": "superseded"})
        return "superseded"
    log.info(
        "case classified",
        extra={
            "event": "case_succeeded",
            "attempt": attempt,
            "model_id": result["model_id"],
            "duration_ms": round(timings["total"] * 1000, 1),
        },
    )
    return "succeeded"


def _requeue_for_retry(config: Settings, case_id: uuid.UUID) -> None:
    """Best effort: put a claimed case back so the retry can claim it (else the sweeper will)."""
    try:
        with session_scope(config) as session:
            from core.models import Case

            case = session.get(Case, case_id)
            if case is not None and case.status == "running":
                cases.requeue_case(session, case_id, attempt=case.attempts, reason="transient_error")
    except Exception as exc:
        log.warning("could not requeue after a transient error; the sweeper will", extra={"error": type(exc).__name__})


@app.task(name=TASK_CLASSIFY, bind=True, max_retries=MAX_RETRIES)
def classify(self: Any, case_id: str) -> str:
    config = settings()
    token = case_id_var.set(case_id)
    try:
        try:
            parsed = uuid.UUID(case_id)
        except (ValueError, TypeError):
            log.error("classify called with something that is not a case id", extra={"event": "bad_message"})
            return "ignored"
        try:
            return run_classification(config, parsed)
        except SoftTimeLimitExceeded:
            with session_scope(config) as session:
                cases.fail_case(
                    session,
                    case_id=parsed,
                    attempt=None,
                    code="timeout",
                    message=f"classification ran past its {config.task_soft_time_limit:.0f} s limit",
                )
            log.warning("case ran past its soft time limit", extra={"event": "soft_time_limit"})
            return "failed"
        except (*TRANSIENT, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and not (exc.connection_invalidated or isinstance(exc, OperationalError)):
                raise
            _requeue_for_retry(config, parsed)
            countdown = min(60.0, 2.0**self.request.retries) * (0.5 + random.random())  # noqa: S311 - jitter
            log.warning(
                "transient error; retrying",
                extra={"event": "retry", "error": type(exc).__name__, "retry_in": round(countdown, 2)},
            )
            raise self.retry(exc=exc, countdown=countdown) from None
        except Exception as exc:
            log.exception("classification failed", extra={"event": "model_error", "error": type(exc).__name__})
            with session_scope(config) as session:
                cases.fail_case(
                    session,
                    case_id=parsed,
                    attempt=None,
                    code="model_error",
                    message=f"the worker failed while classifying ({type(exc).__name__}); "
                    "the case can be submitted again",
                )
            return "failed"
    finally:
        case_id_var.reset(token)


_publisher = None
_redis: redis.Redis | None = None


@app.task(name=TASK_SWEEP)
def sweep() -> dict[str, object]:
    global _publisher, _redis
    config = settings()
    if _publisher is None:
        _publisher = make_publisher(config)
    if _redis is None:
        _redis = redis.Redis.from_url(config.redis_url, socket_connect_timeout=2, socket_timeout=5)
    with session_scope(config) as session:
        return recovery.sweep(session, config, _publisher, _redis).to_dict()


@app.task(name=TASK_PURGE)
def purge() -> dict[str, object]:
    config = settings()
    with session_scope(config) as session:
        return retention.purge_expired(session, config).to_dict()
