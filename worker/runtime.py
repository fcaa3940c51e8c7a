"""The per-process model runtime: one Predictor per worker child, loaded after the fork.

A load failure (a tampered or missing registry entry) is not cached: each case retries the load,
fails with ``model_error`` and a clear message, and the worker stays alive for the next case.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from core.config import Settings

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger("dermq.worker.runtime")
_lock = threading.Lock()
_predictor: Predictor | None = None


class ModelUnavailable(RuntimeError):
    """The configured model could not be loaded; the message says why and is safe to store."""


def get_predictor(settings: Settings) -> Predictor:
    global _predictor
    if _predictor is not None:
        return _predictor
    with _lock:
        if _predictor is None:
            _predictor = _load(settings)
    return _predictor


def _load(settings: Settings) -> Predictor:
    import torch

    from ml.predictor import Predictor
    from ml.registry import RegistryError

    # Each prefork child gets its share of the cores unless told otherwise: N children x N threads
    # each would oversubscribe the CPU and run slower than either alone.
    torch.set_num_threads(settings.worker_threads or max(1, (os.cpu_count() or 1) // settings.worker_concurrency))
    started = time.perf_counter()
    try:
        predictor = Predictor.load(settings.model, device=settings.device, overlay_max_side=settings.overlay_max_side)
    except RegistryError as exc:
        log.error(
            "model failed to load",
            extra={"event": "model_load_failed", "model_id": settings.model, "error": type(exc).__name__},
        )
        raise ModelUnavailable(str(exc)) from None
    predictor.warm_up(rounds=1)
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


def reset() -> None:
    """Forget the loaded model (tests; and after a device failure)."""
    global _predictor
    with _lock:
        _predictor = None
