"""A time budget for one block of code, enforced with SIGALRM: Grad-CAM's, inside the task's own limit."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class GradcamTimeout(Exception):
    """Grad-CAM ran past its own budget; the classification stands without a heat map."""


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`GradcamTimeout` in this block after ``seconds``.

    SIGALRM: only on the main thread, where Celery's prefork children run their tasks (elsewhere
    ``signal.signal`` raises ``ValueError``)."""

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise GradcamTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
