"""Dynamic batches: a worker claims up to ``batch_max_size`` queued cases, classifies them in one
forward pass and stores them in one transaction (:func:`worker.pipeline._store`). A batch whose pass
fails is classified one case at a time, so a case that breaks the model fails alone; cases left
unfinished by a transient error go back to the queue at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from core import case_claims, case_images, case_states
from core.case_images import StoredImage
from core.config import Settings
from core.db import session_scope
from core.enqueue import enqueue
from core.logs import case_id_var
from core.models import Case
from core.publisher import classify_task
from worker import companions, pipeline, results, runtime
from worker.celery_app import app
from worker.pipeline import (
    Classified,
    Progress,
    _classify_image,
    _decode_claimed,
    _fail,
    _model_error,
    _one_by_one_or_raise,
    keyring,
    run_classification,
)
from worker.retries import is_transient

if TYPE_CHECKING:
    from PIL import Image

    from ml.images import DecodedImage
    from ml.predictor import Predictor

log = logging.getLogger("dermq.worker")


@dataclass(frozen=True, slots=True)
class ClaimedCase:
    """A case this worker's batch claimed, with its decrypted image."""

    case_id: uuid.UUID
    attempt: int
    #: seconds from its submission to this worker's claim (``dermq_queue_wait_seconds``)
    queue_wait: float
    image: StoredImage


@dataclass(frozen=True, slots=True)
class DecodedCase:
    """A claimed case whose image decoded, and its timings so far."""

    case_id: uuid.UUID
    attempt: int
    decoded: DecodedImage
    timings: dict[str, float]
    working_copy: bool


def dispatch(config: Settings, case_id: uuid.UUID, progress: Progress) -> str:
    """One case, or a dynamic batch starting with it when batching is on for this worker."""
    if runtime.batching_enabled(config):
        try:
            runtime.get_predictor(config)  # before claiming: cases wait in the queue, not claimed, for the load
        except runtime.ModelUnavailable:
            return run_classification(config, case_id, progress)  # fails the case with model_error
        return run_batch(config, case_id, progress)
    return run_classification(config, case_id, progress)


def run_batch(config: Settings, case_id: uuid.UUID, progress: Progress | None = None) -> str:
    """Claim this case and up to ``batch_max_size - 1`` more queued ones in one statement, classify
    them in one forward pass, explain each, and store them all in one transaction. Returns this
    case's outcome; the other cases' messages are dropped in the worker's main process
    (:mod:`worker.companions`), or, when they get here, find them taken and do nothing. If the batch stops
    with an error, the other cases it still holds go back to the queue (this one is the caller's,
    unless the batch ran out of time: then it goes back too, ``progress.requeued``)."""
    progress = progress if progress is not None else Progress()
    started = time.perf_counter()
    predictor = runtime.get_predictor(config)
    claimed: list[Case] = []
    items: list[ClaimedCase] = []
    unreadable: Mapping[uuid.UUID, Exception] = {}
    # The look, the claim and the images' read share one transaction (one connection checkout, one
    # commit, which need not wait for the disk: a lost claim leaves the case queued for the sweeper).
    with session_scope(config, durable=False) as session:
        # else an earlier batch took it (the usual fate here): one read, and nothing claimed or written
        if case_claims.is_queued(session.connection(), case_id):
            claimed = case_claims.claim_batch(
                session,
                case_id,
                limit=config.batch_max_size,
                max_pixels=config.batch_max_pixels,
                reduce_to=config.overlay_max_side,  # what the worker's decoder is given (pipeline._decode_claimed)
            )
            items, unreadable = with_images(session, config, claimed)
    if not claimed:
        log.info("case not claimable (taken, finished or purged); nothing to do", extra={"event": "skip"})
        return "skipped"
    progress.attempt = claimed[0].attempts  # the claim committed: any failure from here is fenced by it
    outcomes: dict[uuid.UUID, str] = {}
    try:  # from here on, whatever stops the batch (Redis down, the time limit) puts its other cases back
        if len(claimed) > 1:
            # their own messages are dropped in the main process from now on (worker.companions)
            companions.mark(config, [c.id for c in claimed if c.id != case_id])
        _fail_unreadable(config, claimed, unreadable, outcomes)
        progress.settled = outcomes.get(case_id)
        fillable = len(claimed) < config.batch_max_size and claimed[0].attempts == 1  # a retry runs alone
        if fillable and config.batch_max_wait_ms > 0 and predictor.device.type == "cuda":
            time.sleep(config.batch_max_wait_ms / 1000)  # a fuller batch is worth this much waiting on a GPU
            with session_scope(config, durable=False) as session:
                more = case_claims.join_batch(
                    session,
                    case_id,
                    limit=config.batch_max_size - len(claimed),
                    batch_size=config.batch_max_size,
                    max_pixels=config.batch_max_pixels,
                    reduce_to=config.overlay_max_side,
                )
                more_items, unreadable = with_images(session, config, more)
            claimed += more
            items += more_items
            companions.mark(config, [c.id for c in more])
            _fail_unreadable(config, more, unreadable, outcomes)
        _run_claimed_batch(config, predictor, items, started, outcomes, limit_started=progress.started)
    except BaseException as exc:
        progress.settled = outcomes.get(case_id)  # (stopped by a companion's fail, say, after the lead's)
        # out of time, a batch cannot tell which case spent it: this one goes back too, to run alone
        # (a case claimed before joins no batch), rather than end failed on its first attempt
        lead_too = isinstance(exc, SoftTimeLimitExceeded) and len(claimed) > 1
        held = [c for c in claimed if (lead_too or c.id != case_id) and c.id not in outcomes]
        progress.requeued = case_id in _requeue_unfinished(config, held)
        _count_companions(case_id, outcomes)  # those it ended before it stopped: no one else counts them
        raise
    log.info("batch classified", extra={"event": "batch", "count": len(items)})
    _count_companions(case_id, outcomes)
    return outcomes[case_id]


def _count_companions(case_id: uuid.UUID, outcomes: Mapping[uuid.UUID, str]) -> None:
    """Count the outcomes of the cases a batch led by ``case_id`` settled besides it (the task counts
    its own case's; their own messages find them taken and count nothing)."""
    metrics = runtime.worker_metrics()
    if metrics is not None:
        for item_id, outcome in outcomes.items():
            if item_id != case_id:
                metrics.record_outcome(outcome)


def with_images(
    session: Session, config: Settings, claimed: Sequence[Case]
) -> tuple[list[ClaimedCase], Mapping[uuid.UUID, Exception]]:
    """Each claimed case whose image can be read, with it decrypted, read in the claim's transaction;
    and why each other one's cannot (no stored image, or one that does not decrypt). The claim commits
    either way, and the caller fails each unreadable case alone (:func:`_fail_unreadable`): one bad
    case must not stop, or fail, the others its batch took."""
    if not claimed:
        return [], {}
    now = datetime.now(UTC)  # claimed: what follows (the decryption, a batch's wait and decodes) is the worker's
    waited = {c.id: (now - c.created_at).total_seconds() for c in claimed}
    images, unreadable = case_images.read_images(session, keyring=keyring(config), case_ids=[c.id for c in claimed])
    return [ClaimedCase(c.id, c.attempts, waited[c.id], images[c.id]) for c in claimed if c.id in images], unreadable


def _fail_unreadable(
    config: Settings, claimed: Sequence[Case], unreadable: Mapping[uuid.UUID, Exception], outcomes: dict[uuid.UUID, str]
) -> None:
    """Fail each claimed case whose image cannot be read, alone (:func:`worker.pipeline._fail_unreadable`)."""
    for case in claimed:
        if case.id in unreadable:
            token = case_id_var.set(str(case.id))
            try:
                outcomes[case.id] = pipeline._fail_unreadable(config, case.id, case.attempts, unreadable[case.id])
            finally:
                case_id_var.reset(token)


def _run_claimed_batch(
    config: Settings,
    predictor: Predictor,
    items: list[ClaimedCase],
    started: float,
    outcomes: dict[uuid.UUID, str],
    *,
    limit_started: float,
) -> None:
    """Decode, classify, explain and store claimed cases, writing each one's outcome into ``outcomes``
    as soon as it is final (so that a failure part-way knows which cases are still held).
    ``limit_started``: when the task's soft time limit began to run (the heat maps' budget)."""
    claimed_at = time.perf_counter()
    ready: list[DecodedCase] = []
    for item in items:
        timings = {
            "queue_wait": item.queue_wait,
            "claim_and_decrypt": claimed_at - started,
            "batch_size": float(len(items)),
        }
        token = case_id_var.set(str(item.case_id))
        try:
            decoded = _decode_claimed(config, item.case_id, item.attempt, item.image)
        finally:
            case_id_var.reset(token)
        if isinstance(decoded, str):
            outcomes[item.case_id] = decoded
            continue
        timings["decode"] = time.perf_counter() - claimed_at
        ready.append(DecodedCase(item.case_id, item.attempt, decoded, timings, item.image.working_copy))
    if not ready:
        return
    inference_started = time.perf_counter()
    try:
        classified = _classify_batch(config, predictor, [case.decoded.image for case in ready])
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        _one_by_one_or_raise(exc, len(ready), "batch_classify_failed", "a batch failed to classify")
        ready, classified = _classify_one_by_one(config, predictor, ready, outcomes)
        if not ready:
            return
    inference = (time.perf_counter() - inference_started) / len(ready)
    completions = []
    for case, one in zip(ready, classified, strict=True):
        case.timings["inference"] = inference
        token = case_id_var.set(str(case.case_id))
        try:
            completions.append(
                results.completion(
                    config,
                    case.case_id,
                    case.attempt,
                    case.decoded,
                    one.analysis,
                    one.predictor,
                    case.timings,
                    started,
                    working_copy=case.working_copy,
                    limit_started=limit_started,
                )
            )
        finally:
            case_id_var.reset(token)
    pipeline._store(config, completions, outcomes)  # each as it ends: the store may stop part-way


def _classify_one_by_one(
    config: Settings,
    predictor: Predictor,
    ready: list[DecodedCase],
    outcomes: dict[uuid.UUID, str],
) -> tuple[list[DecodedCase], list[Classified]]:
    """Classify a failed batch's cases each alone, so that a case that breaks the model fails by itself
    instead of taking its batch (and, requeued, the next one) with it. Returns the cases that
    classified and their analyses; the others are failed and their outcomes written."""
    done: list[DecodedCase] = []
    classified: list[Classified] = []
    for case in ready:
        token = case_id_var.set(str(case.case_id))
        try:
            classified.append(_classify_image(config, predictor, case.decoded.image, case.attempt))
            done.append(case)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            if is_transient(exc) or runtime.device_failed(exc):
                raise
            log.exception("classification failed", extra={"event": "model_error", "error": type(exc).__name__})
            outcomes[case.case_id] = _fail(
                config,
                case.case_id,
                case.attempt,
                "model_error",
                _model_error(exc, "classifying"),
            )
        finally:
            case_id_var.reset(token)
    return done, classified


def _requeue_unfinished(config: Settings, held: list[Case]) -> set[uuid.UUID]:
    """Put the cases a failed batch still holds back in the queue (fenced by their attempts), each with
    a message of its own, sent once that commits: their first messages were most likely dropped as
    companions (:mod:`worker.companions`), and a case claimed before is claimed only through its own
    message (:mod:`core.case_claims`), never by another batch. Returns the cases put back. If the
    database does not answer, the sweeper does all this (they stay ``running`` until then)."""
    if not held:
        return set()
    requeued: set[uuid.UUID] = set()
    try:
        # their marks go first: the new messages carry the same case ids, and a main process that still
        # found a mark would drop one as a companion, leaving its case queued without a message
        companions.forget(config, [case.id for case in held])
        with session_scope(config) as session:
            for case in held:
                if case_states.requeue_case(session, case.id, attempt=case.attempts, reason="batch_interrupted"):
                    enqueue(session, app, classify_task(case.id, case.priority))
                    requeued.add(case.id)
        log.warning(
            "batch stopped; its other cases went back to the queue",
            extra={"event": "batch_requeued", "count": len(held)},
        )
    except Exception as exc:
        log.warning(
            "batch stopped and its other cases could not be requeued; the sweeper will",
            extra={"event": "requeue_failed", "error": type(exc).__name__, "count": len(held)},
        )
        return set()
    return requeued


def _classify_batch(config: Settings, predictor: Predictor, images: list[Image.Image]) -> list[Classified]:
    """One forward pass for the batch; out of GPU memory, each image alone on the CPU instead."""
    import torch

    try:
        return [Classified(analysis, predictor) for analysis in predictor.classify(images)]
    except torch.OutOfMemoryError:
        runtime.free_device_memory(predictor)
        fallback = runtime.get_cpu_predictor(config, predictor)
        log.warning(
            "out of GPU memory for a batch; running it on the CPU image by image",
            extra={"event": "oom_fallback", "count": len(images)},
        )
        return [Classified(fallback.classify([image])[0], fallback) for image in images]
