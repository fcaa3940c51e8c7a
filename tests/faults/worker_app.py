"""dermq's Celery worker with faults injected into its model, for tests/faults only:

    DERMQ_TEST_FAULTS='{"sleep": 3, "times": 1}' DERMQ_TEST_FAULTS_DIR=/tmp/x \\
        celery -A tests.faults.worker_app worker ...

The app is :data:`worker.celery_app.app`, unchanged, except that its predictors come from a loader
that wraps :func:`worker.runtime.load_predictor`: the real model, whose inference calls first act
out the faults (``DERMQ_TEST_FAULTS``, JSON, see :class:`Faults`). Production modules know nothing
of this. Each fault acted out is counted in a file in ``DERMQ_TEST_FAULTS_DIR`` (shared by the
worker's children, and surviving a child's death), which is also how a test sees that a case has
reached inference: :func:`injected`.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Settings
from worker import runtime
from worker.celery_app import app

if TYPE_CHECKING:
    from ml.predictor import Predictor

__all__ = ["Faults", "app", "injected"]

FAULTS_ENV = "DERMQ_TEST_FAULTS"
COUNTER_ENV = "DERMQ_TEST_FAULTS_DIR"
#: The exit status of a child that a fault ends (os._exit).
EXIT_STATUS = 70


@dataclass(frozen=True)
class Faults:
    """What happens at the start of an inference (a call of ``classify``, one image or a batch)."""

    #: seconds to sleep (a slow job: soft and hard time limits)
    sleep: float = 0.0
    #: block the soft-time-limit signal (SIGUSR1) during that sleep, like native code that never
    #: returns to Python: only the hard limit (the child is killed) ends it
    ignore_soft_limit: bool = False
    #: end the worker child with os._exit (a poison case that kills its worker)
    exit: bool = False
    #: ... only when an image of this [width, height] is in the inference: one poison case among others
    exit_with_size: list[int] | None = None
    #: raise torch.OutOfMemoryError, as a GPU out of memory would
    oom: bool = False
    #: raise MemoryError, as a process out of memory would (a transient error: the case is put back
    #: in the queue and its task retried after a countdown)
    memory_error: bool = False
    #: act only on the first N inferences of the worker (all children together); None: on every one
    times: int | None = None

    @classmethod
    def from_json(cls, text: str) -> Faults:
        return cls(**json.loads(text))


def _counter(folder: Path) -> Path:
    return folder / "injected"


def injected(folder: Path) -> int:
    """How many inferences of the worker using ``folder`` the faults have acted on so far."""
    try:
        return int(_counter(folder).read_text() or 0)
    except FileNotFoundError:
        return 0


def _take_turn(folder: Path, times: int | None) -> bool:
    """Count one more fault unless ``times`` are done already; whether this inference gets it."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = injected(folder)
        if times is not None and done >= times:
            return False
        _counter(folder).write_text(str(done + 1))
        return True


class FaultyPredictor:
    """A predictor whose inference acts out :class:`Faults` before handing over to the real one; every
    other attribute is the real predictor's."""

    def __init__(self, real: Predictor, faults: Faults, folder: Path) -> None:
        self._real, self._faults, self._folder = real, faults, folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def classify(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        self._act(images)
        return self._real.classify(images, *args, **kwargs)

    def _act(self, images: Any) -> None:
        faults = self._faults
        poison = faults.exit_with_size
        if poison is not None and tuple(poison) not in {image.size for image in images}:
            return
        if not _take_turn(self._folder, faults.times):
            return
        if faults.exit:
            os._exit(EXIT_STATUS)
        if faults.sleep:
            if faults.ignore_soft_limit:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                time.sleep(faults.sleep)
            finally:
                if faults.ignore_soft_limit:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        if faults.oom:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected by tests.faults.worker_app)")
        if faults.memory_error:
            raise MemoryError("injected by tests.faults.worker_app")


def _faulty_loader(faults: Faults, folder: Path) -> Callable[[Settings, str], Predictor]:
    real_load = runtime.load_predictor

    def load(settings: Settings, device: str) -> Predictor:
        real = real_load(settings, device)  # (its own fallback to the CPU comes back here: wrapped once)
        if isinstance(real, FaultyPredictor):
            return real  # type: ignore[unreachable]
        return FaultyPredictor(real, faults, folder)  # type: ignore[return-value]

    return load


if FAULTS_ENV in os.environ:
    # in this process only, before the fork: the children's predictors come through it
    runtime.load_predictor = _faulty_loader(Faults.from_json(os.environ[FAULTS_ENV]), Path(os.environ[COUNTER_ENV]))
