"""Prometheus metrics of a worker host, aggregated over Celery's prefork children.

prometheus_client's multiprocess mode: every process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (created by :func:`worker.celery_app.prepare_multiprocess_dir` when the
worker starts, unless the deployment sets it), and the main worker process serves the sum on
``DERMQ_METRICS_HOST:DERMQ_WORKER_METRICS_PORT``. A child that exits is marked dead so its live
gauges disappear.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.metrics_files import MultiProcessFiles, fold
from core.retention_steps import STEPS

if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # pragma: no cover - prepare_multiprocess_dir() runs first
    raise RuntimeError("import worker.metrics only in worker processes, after prepare_multiprocess_dir()")

log = logging.getLogger("dermq.worker.metrics")

SECONDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
JOBS = Counter(
    "dermq_jobs_total",
    "classification outcomes: succeeded (with a diagnosis or out of distribution: see dermq_results_total), "
    "failed, superseded (a newer attempt owned the case), requeued (its batch ran out of time: it runs "
    "again, alone), skipped "
    "(a message that reached a worker child and found its case already taken; the messages of cases a "
    "batch took are mostly acknowledged before, in the worker's main process, and not counted here)",
    ["outcome"],
)
QUEUE_WAIT = Histogram(
    "dermq_queue_wait_seconds",
    "time from submission to a worker's claim",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
INFERENCE = Histogram("dermq_inference_seconds", "classification time per case", buckets=SECONDS)
GRADCAM = Histogram("dermq_gradcam_seconds", "heat-map time per case", buckets=SECONDS)
RESULTS = Counter(
    "dermq_results_total",
    "stored results by outcome: diagnosis, or out_of_distribution (the image is not a dermoscopy image the "
    "model can judge; no diagnosis was made)",
    ["outcome"],
)
OUT_OF_DISTRIBUTION_REASONS = Counter(
    "dermq_out_of_distribution_reasons_total",
    "why images were judged out of distribution (a case with several reasons counts once for each)",
    ["reason"],
)
PREDICTIONS = Counter("dermq_predictions_total", "predicted labels of diagnoses", ["label"])
CONFIDENCE = Histogram(
    "dermq_confidence",
    "calibrated probability of the predicted label",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
REFERRALS = Counter("dermq_referrals_total", "cases flagged for clinician review")
SUBMIT_TO_FINISH = Histogram(
    "dermq_submit_to_finish_seconds",
    "time from submission to the stored result, per case",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)
FAILURES = Counter("dermq_failures_total", "failed cases by failure code", ["code"])
LOST = Counter(
    "dermq_lost_cases_total",
    "cases the recovery sweep found still running past their hard time limit (their worker crashed, was "
    "killed or ran out of time): requeued, or failed 'timeout' once their attempts were spent",
    ["outcome"],
)
for _outcome in ("requeued", "failed"):  # present from the start: increase() skips a series' first sample
    LOST.labels(_outcome)
KEY_UNAVAILABLE = Counter(
    "dermq_image_key_unavailable_total",
    "claimed cases put back in the queue because their image's key could not be loaded (a period key file "
    "unreadable or exposed, the key volume away): they wait, their attempt given back, until it is mended",
)
CALLBACKS = Counter(
    "dermq_callback_deliveries_total",
    "completion callback messages by outcome: delivered, retry (refused, tried again later), failed (given up); "
    "not attempted: cancelled (its case erased, its clinic deactivated or its callback removed: nothing is sent), "
    "reregistered (the clinic registered its callback again after the attempt was leased: nothing is sent to the "
    "registration it replaced, and the message takes the attempt again at once), "
    "deferred (the clinic's receiver had its fill of attempts under way), early (a retry not due yet), held (its "
    "row locked by another transaction at that moment: the message looks again, a second later, then after ever "
    "longer waits), held_too_long (locked at each of DERMQ_CALLBACK_HELD_LOOKS looks: the message ends and the "
    "sweeper sends the delivery again once the row is free), skipped (nothing to do: done, held by another worker, "
    "or a copy)",
    ["outcome"],
)
CALLBACK_OUTCOMES = (
    *("delivered", "retry", "failed", "cancelled", "reregistered", "deferred", "early"),
    *("held", "held_too_long", "skipped"),
)
for _outcome in CALLBACK_OUTCOMES:  # present from the start: increase() skips a series' first sample
    CALLBACKS.labels(_outcome)
RETENTION_FAILURES = Counter(
    "dermq_retention_step_failures_total",
    "retention steps (beat's purge) that failed, by step (destroy_periods: one per period whose key could not be "
    "destroyed; the other periods were destroyed); the others still ran (the log's retention_step_failed says why)",
    ["step"],
)
for _step in STEPS:  # present from the start: increase() skips a series' first sample
    RETENTION_FAILURES.labels(_step)
# Summed or maxed over the live processes, not one series per process ("liveall" adds a pid label):
# a worker replaces its children every few thousand cases, and each would leave a new set of series.
WORKER_INFO = Gauge(
    "dermq_worker_info",
    "worker processes that have loaded a model, by device and model",
    ["device", "model_id"],
    multiprocess_mode="livesum",
)
GPU_MEMORY = Gauge(
    "dermq_gpu_memory_bytes",
    "memory in use on the worker's GPU, by every process on it (CUDA contexts and caches included)",
    ["device"],
    multiprocess_mode="livemax",
)
GPU_MEMORY_TOTAL = Gauge(
    "dermq_gpu_memory_total_bytes", "the worker GPU's memory", ["device"], multiprocess_mode="livemax"
)


def record_outcome(outcome: str) -> None:
    JOBS.labels(outcome).inc()


def record_result(result: dict[str, object], timings: dict[str, float]) -> None:
    """Count a stored result. An out-of-distribution one counts by its reasons, never as a label."""
    QUEUE_WAIT.observe(timings.get("queue_wait", 0.0))
    SUBMIT_TO_FINISH.observe(timings.get("queue_wait", 0.0) + timings.get("total", 0.0))
    INFERENCE.observe(timings.get("inference", 0.0))
    if result.get("gradcam_status") == "ok":
        GRADCAM.observe(timings.get("gradcam", 0.0))
    outcome = str(result.get("outcome", "diagnosis"))
    RESULTS.labels(outcome).inc()
    if outcome != "diagnosis":
        reasons = result.get("ood_reasons")
        for reason in reasons if isinstance(reasons, list) else ():
            OUT_OF_DISTRIBUTION_REASONS.labels(str(reason)).inc()
        return
    PREDICTIONS.labels(str(result["label"])).inc()
    CONFIDENCE.observe(float(result["confidence"]))  # type: ignore[arg-type]
    if result.get("referral"):
        REFERRALS.inc()


def record_failure(code: str) -> None:
    FAILURES.labels(code).inc()


def record_key_unavailable() -> None:
    KEY_UNAVAILABLE.inc()


def record_lost(requeued: int, failed: int) -> None:
    """What the recovery sweep did with the cases whose worker was lost. Those it failed count as
    failed jobs too: no worker survived to count them, and the failure rate must see them."""
    LOST.labels("requeued").inc(requeued)
    LOST.labels("failed").inc(failed)
    JOBS.labels("failed").inc(failed)
    FAILURES.labels("timeout").inc(failed)


def record_callback(outcome: str) -> None:
    CALLBACKS.labels(outcome).inc()


def record_retention_failure(step: str) -> None:
    RETENTION_FAILURES.labels(step).inc()


def record_model(device: str, model_id: str) -> None:
    WORKER_INFO.labels(device, model_id).set(1)


def record_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the card's own count (cudaMemGetInfo), not torch's allocations: those leave out each child's
        # CUDA context, torch's cache and any other process, and read well under a card that is full
        try:
            device = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # a card that failed while the model loaded (the child serves on the CPU):
            return  # a gauge is never worth the child (the error would read as the GPU failing mid-pass)
        GPU_MEMORY.labels(f"cuda:{device}").set(total - free)
        GPU_MEMORY_TOTAL.labels(f"cuda:{device}").set(total)


def serve(host: str, port: int) -> None:
    """Serve the aggregated metrics from the main worker process (call once, before forking)."""
    if not port:
        return
    registry = CollectorRegistry()
    MultiProcessFiles(registry)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("worker metrics listener could not start", extra={"error": type(exc).__name__})
        return
    log.info("worker metrics listening", extra={"event": "metrics_listening"})


def child_exited(pid: int) -> None:
    """A child's exit: its counters and histograms go to the folder's archive files (:func:`fold`)."""
    fold(os.environ["PROMETHEUS_MULTIPROC_DIR"], pid)


def cleanup() -> None:
    """Remove the sample files of a worker that created its own folder (not one set by the deployment)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if folder.startswith(tempfile.gettempdir()) and "dermq-worker-metrics-" in folder:
        shutil.rmtree(folder, ignore_errors=True)
