"""The per-process model runtime: one Predictor per worker child, loaded after the fork.

A load failure (a tampered or missing registry entry) is not cached: each case retries the load,
fails with ``model_error`` and a clear message, and the worker stays alive for the next case.

When the GPU runs out of memory on a case, the task frees the CUDA cache and runs that case on a
second, CPU predictor (:func:`get_cpu_predictor`, loaded on the first such case and kept); the
CUDA predictor stays loaded and serves the next cases.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from core import heap
from core.config import Settings
from core.cpus import usable_cpus

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger("dermq.worker.runtime")
_lock = threading.Lock()
_predictor: Predictor | None = None
_cpu_predictor: Predictor | None = None


#: What a clinic is told when the model cannot be loaded. The registry's own error names files and
#: digests: operators see it with ``dermq model verify``, never a clinic.
MODEL_UNAVAILABLE = (
    "the worker's model was not loaded: its files are missing or failed their integrity check; "
    "the operators are alerted, submit the case again later"
)


class ModelUnavailable(RuntimeError):
    """The configured model could not be loaded; the message is :data:`MODEL_UNAVAILABLE`, safe to store."""


class WorkerMetrics(Protocol):
    """What the pipeline records in :mod:`worker.metrics` (the module itself is the implementation)."""

    def record_outcome(self, outcome: str) -> None: ...

    def record_result(self, result: dict[str, Any], timings: dict[str, float]) -> None: ...

    def record_failure(self, code: str) -> None: ...

    def record_lost(self, requeued: int, failed: int) -> None: ...

    def record_key_unavailable(self) -> None: ...

    def record_callback(self, outcome: str) -> None: ...

    def record_retention_failure(self, step: str) -> None: ...

    def record_model(self, device: str, model_id: str) -> None: ...

    def record_gpu_memory(self) -> None: ...


def worker_metrics() -> WorkerMetrics | None:
    """:mod:`worker.metrics` in a worker process. None where there is no ``PROMETHEUS_MULTIPROC_DIR``
    (a process that runs the pipeline outside a Celery worker): prometheus_client's multiprocess
    values must be chosen before the metrics are created, so the module refuses to load there."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    from worker import metrics

    return metrics


def get_predictor(settings: Settings) -> Predictor:
    global _predictor
    if _predictor is not None:
        return _predictor
    with _lock:
        if _predictor is None:
            _predictor = load_predictor(settings, settings.device)
            metrics = worker_metrics()
            if metrics is not None:
                metrics.record_model(str(_predictor.device), _predictor.info.model_id)
    return _predictor


def get_cpu_predictor(settings: Settings, primary: Predictor) -> Predictor:
    """A predictor on the CPU for a case the primary device could not take; the primary itself when
    it already runs on the CPU."""
    global _cpu_predictor
    if primary.device.type == "cpu":
        return primary
    if _cpu_predictor is not None:
        return _cpu_predictor
    with _lock:
        if _cpu_predictor is None:
            _cpu_predictor = load_predictor(settings, "cpu")
    return _cpu_predictor


def free_device_memory(predictor: Predictor) -> None:
    """Give back what a failed CUDA call left allocated (its tensors are garbage by now)."""
    gc.collect()
    if predictor.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


#: a worker child's exit status when its GPU failed (:func:`end_child`)
EXIT_DEVICE_FAILED = 75


def device_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says this process's GPU can no longer be used: a CUDA error other than running
    out of memory (an illegal memory access, a device-side assert, a device that fell off the bus).
    Such errors are sticky: every later CUDA call of the process fails too, so each case this child
    took afterwards would fail ``model_error``. Only a new process has a new CUDA context."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or isinstance(exc, torch.OutOfMemoryError):
        return False  # no torch, no CUDA; out of memory is handled case by case (pipeline._classify_image)
    if isinstance(exc, torch.AcceleratorError):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")


def end_child() -> NoReturn:
    """End this worker child at once after its GPU failed in a pass (a model that loaded and ran), the
    cases it held already back in the queue (a GPU that fails while the model loads is left for
    the CPU instead: :func:`load_predictor`).
    Celery's parent starts a new child, with a new CUDA context, and the task's message comes back
    (``task_reject_on_worker_lost``) to claim its case again. Never returns."""
    log.critical("the GPU failed; this worker child exits for a new one", extra={"event": "device_failed"})
    logging.shutdown()  # flush what was logged: nothing after this runs
    os._exit(EXIT_DEVICE_FAILED)


def batching_enabled(config: Settings) -> bool:
    """Whether this worker claims and runs queued cases in batches (``DERMQ_BATCHING``; auto: yes).

    On a GPU one batched pass costs about one image's. On the CPU a pass costs about the sum of its
    images, but a batch is claimed, audited and stored in a fixed number of statements and one
    commit per transaction instead of about a dozen statements and two commits per case, which is
    the larger share of a case on a CPU worker: ``python -m bench.pipeline`` measured 1.5x the
    throughput draining a backlog. An idle queue gives batches of one, with no wait on the CPU."""
    return config.batching != "off" and config.batch_max_size > 1


def warm_batch_shapes(settings: Settings, predictor: Predictor) -> None:
    """Warm every shape a batching GPU worker's batches run at (powers of two up to
    ``batch_max_size``'s, ml.backends): cuDNN builds its plans for each on first use, 1.7-2.7 s a
    shape on an H200 (docs/PERFORMANCE.md, "GPU"), which the first cases of each size would otherwise
    wait out. A GPU too small for the largest leaves that shape cold, not the worker down: a batch of
    that size that runs out of memory runs on the CPU, as any does."""
    import torch

    try:
        predictor.warm_up(rounds=0, batch_sizes=range(1, settings.batch_max_size + 1))
    except torch.OutOfMemoryError:
        free_device_memory(predictor)
        log.warning("out of GPU memory warming the batch shapes", extra={"event": "warm_up_out_of_memory"})


def check_model_pin(settings: Settings, manifest_sha256: str | None = None) -> None:
    """The configured entry's manifest is the one ``DERMQ_MODEL_SHA256`` pins, else
    :class:`~ml.registry.RegistryError`; in production a pin is required (a manifest edit that keeps the
    verification image's answer, such as a referral threshold, changes what is served unseen).

    ``manifest_sha256``: the digest of the manifest a predictor parsed (``predictor.info.manifest_sha256``),
    which decides whether it may serve; without it, the file as it is now (a worker's start)."""
    from ml import registry

    if settings.model_sha256:
        registry.check_pinned(settings.model, settings.model_sha256, actual=manifest_sha256)
    elif settings.environment == "production":
        raise registry.RegistryError(
            f"production serves a pinned model: set DERMQ_MODEL_SHA256 to the SHA-256 of {settings.model}'s "
            "manifest, as `dermq model list` prints it once `dermq model verify` has passed"
        )


def _loaded_and_warm(settings: Settings, device: str, threads: int) -> Predictor:
    from ml.entry import check_known_answer
    from ml.predictor import Predictor

    predictor = Predictor.load(
        settings.model,
        device=device,
        backend=settings.backend,
        threads=threads,
        overlay_max_side=settings.overlay_max_side,
    )
    # the manifest it was loaded from is the one deployed (checked on the bytes it parsed, not the file
    # read again, which may have been replaced meanwhile): before it serves or warms up
    check_model_pin(settings, predictor.info.manifest_sha256)
    # before it serves: the answer its entry recorded (an entry without one is refused in production)
    check_known_answer(settings.model, predictor, required=settings.environment == "production")
    predictor.warm_up(rounds=1)
    if predictor.device.type == "cuda" and batching_enabled(settings):
        warm_batch_shapes(settings, predictor)
    return predictor


def pin_threads(threads: int) -> None:
    """PyTorch's intra-op threads to ``threads`` (ONNX Runtime's are the predictor's), and NumPy's
    OpenBLAS to one. OpenBLAS started a thread per core in the parent, and a call on two waits for a
    second thread that the other children, the API or ONNX Runtime hold, then spins: the worker's NumPy
    products are small (the gate's statistics, the overlay's levels), and with two threads the overlay's
    levels took a camera backlog from 58 to 25 cases/s and a 12 MP result from 62 to 85 ms."""
    import torch

    torch.set_num_threads(threads)
    pin_blas()


def pin_blas() -> None:
    """NumPy's OpenBLAS to one thread in this process (see :func:`pin_threads`)."""
    import threadpoolctl  # the worker's image only (beat and Flower import this module from the API's)

    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def load_predictor(settings: Settings, device: str) -> Predictor:
    """The configured model on ``device``, warmed up; :class:`ModelUnavailable` if it fails its checks."""
    import torch

    from ml.registry import KnownAnswerDiffers, RegistryError

    # Each prefork child gets its share of the cores unless told otherwise: N children x N threads
    # each would oversubscribe the CPU and run slower than either alone.
    threads = threads_per_child(settings)
    pin_threads(threads)
    if device != "cpu":  # cuDNN runs float32 convolutions in TF32 unless told: not what was fitted (ml.backends)
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    unusable_card = ""
    try:
        predictor = _loaded_and_warm(settings, device, threads)
    except torch.OutOfMemoryError:
        if device == "cpu":
            raise
        unusable_card = "full"  # handled below: this handler's traceback still holds the half-loaded model
    except Exception as exc:
        if isinstance(exc, KnownAnswerDiffers) and exc.device != "cpu":
            # another answer than the one recorded on a CPU: the CPU's own check decides whether the card
            # or the entry (a manifest that lies fails there too) is to blame
            unusable_card = "differs"
        elif device != "cpu" and device_failed(exc):
            # a GPU that fails before the model ever ran (no kernel for its architecture, a card off the
            # bus): a new child would meet the same card, and failing each case it took would fail the
            # shared queue's cases that other hosts could classify
            unusable_card = "failed"
        elif isinstance(exc, RegistryError):  # a bad entry: its cases fail model_error once claimed
            log.error(
                "model failed to load",
                extra={"event": "model_load_failed", "model_id": settings.model, "error": type(exc).__name__},
            )
            raise ModelUnavailable(MODEL_UNAVAILABLE) from None
        else:
            raise
    if unusable_card:
        # serve on the CPU, slower but every case goes on; dermq_worker_info shows the device, and the
        # next child (max tasks per child) tries the card again
        if unusable_card != "differs":
            log.log(
                logging.WARNING if unusable_card == "full" else logging.ERROR,
                "the GPU could not load the model; this child serves on the CPU",
                extra={
                    "event": "load_out_of_memory" if unusable_card == "full" else "load_device_failed",
                    "model_id": settings.model,
                },
            )
        gc.collect()  # what the failed load allocated on the card, given back before the CPU load
        if unusable_card != "failed":
            torch.cuda.empty_cache()  # (a failed card's context takes no more calls)
        served = load_predictor(settings, "cpu")  # ModelUnavailable if the entry is to blame
        if unusable_card == "differs":  # the CPU gives the recorded answer: the card computes another
            log.error(
                "the GPU does not give the model's known answer; this child serves on the CPU",
                extra={"event": "known_answer_differs", "model_id": settings.model},
            )
        return served
    log.info(
        "model loaded",
        extra={
            "event": "model_loaded",
            "model_id": predictor.info.model_id,
            "device": str(predictor.device),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return predictor


def cuda_device_present(settings: Settings) -> bool:
    """Whether this worker will run on CUDA, decided without initialising CUDA (the prefork parent
    must not: CUDA is not fork-safe) -- by the setting, or for ``auto`` by the driver's device nodes."""
    if settings.device.startswith("cuda"):
        return True
    if settings.device != "auto":
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def worker_concurrency(settings: Settings) -> int:
    """Celery prefork children: the setting, or (0, auto) one per usable core (:mod:`core.cpus`: the
    affinity, capped by a container's CPU limit) on the CPU, and one on CUDA."""
    if settings.worker_concurrency:
        return settings.worker_concurrency
    return 1 if cuda_device_present(settings) else usable_cpus()


def threads_per_child(settings: Settings) -> int:
    """Each child's intra-op threads: the setting, or (0, auto) the usable cores shared among the children."""
    return settings.worker_threads or max(1, usable_cpus() // worker_concurrency(settings))


def preload(settings: Settings) -> threading.Thread:
    """Load and warm the model in the background right after the fork, so the child's first case
    does not pay for importing torch and loading weights; a case that arrives meanwhile waits for it.
    Then the child's heap, the model's included, is frozen out of garbage collection (:mod:`core.heap`;
    with the preload off, the model loads at the first case and its objects stay in the collected heap)."""

    def load() -> None:
        try:
            get_predictor(settings)
        except Exception as exc:  # the first case will retry and fail with a clear model_error
            log.error("model preload failed", extra={"event": "model_preload_failed", "error": type(exc).__name__})
            return
        heap.settle("worker-child")  # PyTorch, ONNX Runtime and the model: frozen for the child's life

    thread = threading.Thread(target=load, name="dermq-model-preload", daemon=True)
    thread.start()
    return thread
