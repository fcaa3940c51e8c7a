"""What Celery is told of an error that ends a dermq task: its type and where it happened, never its
text. Celery puts the error's repr and traceback (every error chained to it included) in its
``task-retried`` and ``task-failed`` events, which Flower shows and keeps; a database error's text can
quote the values of the failing statement or the whole failing row (Postgres's ``Failing row
contains (...)``: a client reference, a plain idempotency key, a label).
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import TaskPredicate


class WithheldError(Exception):
    """What Celery is given in place of an error: its type only."""


def withheld(exc: BaseException) -> WithheldError:
    return WithheldError(f"{type(exc).__name__} (details withheld: they may quote patient data)")


class WithholdingTask(Task):
    """The class of every dermq task: an error that ends one reaches Celery (its events, its log line)
    as a :class:`WithheldError` with the error's frames and without its text or its chain. Celery's
    own signals to retry, ignore or reject a message pass as they are, and a ``MemoryError``, which
    Celery ends the child for (the message then comes back: ``task_reject_on_worker_lost``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (TaskPredicate, WithheldError, MemoryError):
            raise
        except Exception as exc:
            raise withheld(exc).with_traceback(exc.__traceback__) from None
