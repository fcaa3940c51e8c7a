"""The one-case pipeline of a worker: settings and keys of the process, claim a case, decode its
image, classify it, and store the results of one or several cases in one transaction (falling back
to one case at a time when the database refuses the batch). The Celery tasks are :mod:`worker.tasks`;
dynamic batches are :mod:`worker.batching`; the retry policy is :mod:`worker.retries`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from core import callbacks, case_claims, case_images, case_states, enqueue
from core.case_images import StoredImage
from core.config import Settings
from core.crypto import Keyring, KeyringSource
from core.db import session_scope
from core.errors import KeyringError
from core.logs import case_id_var
from ml import working_copy
from ml.decode_budget import DecodeBudget, TooLargeToDecode
from ml.images import DecodedImage, ImageLimits, InvalidImage, decode
from worker import results, runtime
from worker.celery_app import app
from worker.retries import is_transient

if TYPE_CHECKING:
    from PIL import Image

    from ml.predictor import Analysis, Predictor

log = logging.getLogger("dermq.worker")


_keyrings: dict[str, KeyringSource] = {}


def settings() -> Settings:
    return app.dermq_settings


def keyring(config: Settings) -> Keyring:
    """The keyring for these settings (re-read when the key file changes: rotation)."""
    cache_key = f"{config.key_file}|{config.keys_json is not None}"
    if cache_key not in _keyrings:
        _keyrings[cache_key] = KeyringSource(config)
    return _keyrings[cache_key].get()


@dataclass
class Progress:
    """How far one run got: the error handlers of ``classify`` need the attempt it claimed, and
    whether a batch that ran out of time put this case back in the queue. ``started``: when the task
    began (its soft time limit counts from then, a model's load included). ``settled``: the outcome
    a batch gave this case before it stopped (failed, or put back with its attempt given back, after
    which another worker's claim may hold the same attempt number): the handlers leave it alone."""

    attempt: int | None = None
    requeued: bool = False
    started: float = field(default_factory=time.perf_counter)
    settled: str | None = None


@dataclass(frozen=True, slots=True)
class Classified:
    """The analysis of one image and the predictor that made it (the CPU one after the GPU ran out of
    memory: its device goes in the result)."""

    analysis: Analysis
    predictor: Predictor


def _ended(config: Settings, case_id: uuid.UUID, transition: Callable[[Session], bool]) -> bool:
    """Run a terminal transition in its own transaction together with the case's callback outbox row
    (whose delivery is sent once that committed)."""
    with session_scope(config) as session:
        ended = transition(session)
        if ended:
            callbacks.note_finished(session, case_id, publisher=app)
    return ended


def _model_error(exc: BaseException, doing: str) -> str:
    """The message stored with a ``model_error`` failure: what failed and the error's type, no details."""
    return f"the worker failed while {doing} ({type(exc).__name__}); the case can be submitted again"


def _fail(config: Settings, case_id: uuid.UUID, attempt: int | None, code: str, message: str) -> str:
    """Fail the case, fenced by ``attempt`` (None: whatever attempt holds it, when the claim's is unknown)."""
    failed = _ended(
        config,
        case_id,
        lambda session: case_states.fail_case(session, case_id=case_id, attempt=attempt, code=code, message=message),
    )
    if not failed:  # stored, failed or taken over meanwhile: not this attempt's to fail, nor to count
        log.info("case no longer this attempt's; not failed", extra={"event": "superseded", "attempt": attempt})
        return "superseded"
    log.info("case failed", extra={"event": "case_failed", "code": code, "attempt": attempt})
    metrics = runtime.worker_metrics()
    if metrics is not None:
        metrics.record_failure(code)
    return "failed"


#: why a claimed case's image could not be read that is not the case's doing: its period's key file
#: unreadable or exposed, the key volume failing (an operator's to mend, the image intact)
KEY_UNAVAILABLE = (KeyringError, OSError)


def _fail_unreadable(config: Settings, case_id: uuid.UUID, attempt: int, error: Exception) -> str:
    """Fail a claimed case whose stored image cannot be read (none stored, or one that does not decrypt),
    fenced by its attempt: no retry can help, and the claim has committed. A key that cannot be loaded
    (:data:`KEY_UNAVAILABLE`) puts the case back in the queue instead, its attempt given back, for the
    sweeper to publish again after ``requeue_grace_seconds``: failing it would fail every case of the
    queue for as long as a key volume is away, and counting each try would fail them all once it came
    back. It waits as long as that takes, counted (``dermq_image_key_unavailable_total``, the
    DermqImageKeyUnavailable alert): each try starts its wait in the queue afresh, so no alert on the
    queue's age sees it."""
    if isinstance(error, KEY_UNAVAILABLE):
        log.error(
            "a claimed case's key cannot be loaded; the case goes back to the queue",
            extra={"event": "image_key_unavailable", "error": type(error).__name__, "attempt": attempt},
        )
        metrics = runtime.worker_metrics()
        if metrics is not None:
            metrics.record_key_unavailable()
        with session_scope(config) as session:
            requeued = case_states.requeue_case(
                session, case_id, attempt=attempt, reason="key_unavailable", uncounted=True
            )
        return "requeued" if requeued else "superseded"
    log.error(
        "a claimed case's stored image cannot be read",
        extra={"event": "image_unreadable", "error": type(error).__name__},
    )
    return _fail(config, case_id, attempt, "model_error", _model_error(error, "reading its stored image"))


def _classify_image(config: Settings, predictor: Predictor, image: Image.Image, attempt: int) -> Classified:
    """Inference on the primary predictor; when its GPU runs out of memory, free the cache and run this
    case on a CPU predictor (the CUDA one stays for the next cases)."""
    import torch

    try:
        return Classified(predictor.classify([image])[0], predictor)
    except torch.OutOfMemoryError:
        runtime.free_device_memory(predictor)
        fallback = runtime.get_cpu_predictor(config, predictor)
        log.warning(
            "out of GPU memory; running this case on the CPU",
            extra={"event": "oom_fallback", "device": str(fallback.device), "attempt": attempt},
        )
        return Classified(fallback.classify([image])[0], fallback)


def _decode_claimed(config: Settings, case_id: uuid.UUID, attempt: int, stored: StoredImage) -> DecodedImage | str:
    """The image of a case this worker has just claimed, decoded (its working copy read, where the
    intake made one); or, when the case is past its attempt limit or its image does not decode, the
    outcome of failing it."""
    if attempt > config.max_attempts:
        return _fail(config, case_id, attempt, "attempts_exhausted", f"gave up after {config.max_attempts} attempts")
    if stored.working_copy:
        try:
            return working_copy.read(stored.data)
        except working_copy.InvalidWorkingCopy as exc:
            return _fail(config, case_id, attempt, "invalid_image", str(exc))
    data = stored.data
    # A worker child decodes one image at a time, so its budget only has to refuse the single image
    # that could never fit (the intake refuses those too, unless its settings differ).
    budget = DecodeBudget(config.decode_memory_bytes, wait_seconds=0)
    try:
        return decode(
            data,
            ImageLimits.from_settings(config),
            reduce_to=config.overlay_max_side,
            budget=budget,
            passthrough=(SoftTimeLimitExceeded,),  # out of time, not a damaged file: the task's to handle
        )
    except InvalidImage as exc:
        return _fail(config, case_id, attempt, "invalid_image", exc.message)
    except TooLargeToDecode as exc:
        return _fail(config, case_id, attempt, "invalid_image", str(exc))


def run_classification(config: Settings, case_id: uuid.UUID, progress: Progress | None = None) -> str:
    """Claim, classify, explain and store one case. Returns what happened, for logs and tests."""
    progress = progress if progress is not None else Progress()
    started = time.perf_counter()
    # The claim and the image's read share one transaction (one connection checkout, one commit).
    with session_scope(config, durable=False) as session:  # a lost claim leaves the case queued
        case = case_claims.claim_case(session, case_id)
        if case is None:
            log.info("case not claimable (taken, finished or purged); nothing to do", extra={"event": "skip"})
            return "skipped"
        attempt = case.attempts
        # until the claim: the decryption and decode that follow are the worker's time, not the queue's
        queue_wait = (datetime.now(UTC) - case.created_at).total_seconds()
        images, unreadable = case_images.read_images(session, keyring=keyring(config), case_ids=[case_id])
    progress.attempt = attempt
    if case_id in unreadable:
        return _fail_unreadable(config, case_id, attempt, unreadable[case_id])
    stored = images.pop(case_id)
    timings: dict[str, float] = {"queue_wait": queue_wait}
    claimed = time.perf_counter()
    timings["claim_and_decrypt"] = claimed - started
    decoded = _decode_claimed(config, case_id, attempt, stored)
    working_copy = stored.working_copy
    del stored
    if isinstance(decoded, str):
        return decoded
    image = decoded.image
    timings["decode"] = time.perf_counter() - claimed

    try:
        predictor = runtime.get_predictor(config)
    except runtime.ModelUnavailable as exc:
        return _fail(config, case_id, attempt, "model_error", str(exc))
    inference_started = time.perf_counter()
    classified = _classify_image(config, predictor, image, attempt)
    timings["inference"] = time.perf_counter() - inference_started

    completion = results.completion(
        config,
        case_id,
        attempt,
        decoded,
        classified.analysis,
        classified.predictor,
        timings,
        started,
        working_copy=working_copy,
        limit_started=progress.started,
    )
    return _store(config, [completion])[case_id]


def _store(
    config: Settings, completions: Sequence[case_states.Completion], outcomes: dict[uuid.UUID, str] | None = None
) -> dict[uuid.UUID, str]:
    """Results, heat maps, audit events and callback outbox rows of ``completions`` in one transaction
    (a fixed number of statements however many; the callbacks are sent once it committed); returns
    each case's outcome, written into ``outcomes`` (when given) as soon as it is final: a batch that
    stops part-way (a transient error storing a case alone) knows which of its cases ended.

    If a batch's transaction fails for anything but a transient error, each case is stored on its
    own instead, so that one case the database refuses fails alone rather than its whole batch,
    again and again."""
    try:
        # Without waiting for the disk: nobody learns of these results before a durable commit follows
        # (the API's audited read, a callback's lease); one lost in a crash is classified again.
        with session_scope(config, durable=False) as session:
            stored = case_states.complete_cases(session, keyring=keyring(config), completions=completions)
            callbacks.note_finished_many(
                session, [c.case_id for c in completions if c.case_id in stored], publisher=app
            )
    except enqueue.SentPastTheLimit:  # stored: the limit ran out sending the callbacks' messages after
        log.warning(  # the commit; the sweeper sends the rest, and the cases are counted as what they are
            "the soft time limit ran out sending the results' callbacks; the sweeper sends the rest",
            extra={"event": "publish_out_of_time", "count": len(completions)},
        )
    except Exception as exc:  # the soft time limit too: storing what is classified, one by one, is quick
        _one_by_one_or_raise(exc, len(completions), "batch_store_failed", "storing a batch failed")
        return _store_one_by_one(config, completions, {} if outcomes is None else outcomes)
    metrics = runtime.worker_metrics()
    outcomes = {} if outcomes is None else outcomes
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
            if metrics is not None:
                metrics.record_result(result, result["timings"])
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
    if metrics is not None:
        metrics.record_gpu_memory()
    return outcomes


def _one_by_one_or_raise(exc: Exception, count: int, event: str, what: str) -> None:
    """Re-raise ``exc`` unless it stopped a batch of ``count`` cases for a reason other than a transient
    one; then log that the batch's cases will be handled one by one (so that the case at fault fails
    alone), and return."""
    # out of memory in a batch: one case at a time needs less, so the batch is split, not retried
    if count < 2 or (is_transient(exc) and not isinstance(exc, MemoryError)) or runtime.device_failed(exc):
        raise exc
    log.warning(
        f"{what}; handling its cases one by one",
        extra={"event": event, "error": type(exc).__name__, "count": count},
    )


def _store_one_by_one(
    config: Settings, completions: Sequence[case_states.Completion], outcomes: dict[uuid.UUID, str]
) -> dict[uuid.UUID, str]:
    """:func:`_store` for each completion alone, into ``outcomes``; a case whose result cannot be stored fails."""
    for completion in completions:
        try:
            _store(config, [completion], outcomes)
        except SoftTimeLimitExceeded:
            raise  # not a result the database refused: the task's handler ends its case as timed out
        except Exception as exc:
            if is_transient(exc):
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
