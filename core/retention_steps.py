"""How retention's steps run (:func:`core.retention.run`): each on its own, so that one that fails stops
none of the others (a period key file with a wrong mode once kept every later step from running, run
after run).

A failure is logged (``retention_step_failed``: the step, the error, and the period for a period whose
key could not be destroyed, since ``destroy_periods`` goes on with the other periods), kept in the run's
report, and handed at once to whoever runs retention (``on_failure``: beat's purge counts it in
``dermq_retention_step_failures_total``, ``dermq case purge-expired`` prints it). At once, not when the
run returns: a run can still end without returning (its database lost, a time limit), and the failures
before that must not be lost with it. A database that cannot be reached at all is no failed step: no
step could run; it ends the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from core.errors import DecryptionError, DermqError, KeyringError

log = logging.getLogger("dermq.retention")

#: retention's steps, in the order they run (the names its log and metrics give a failed one)
STEPS = ("purge_cases", "destroy_periods", "prune_field_months", "forget_callback_secrets", "prune_callback_deliveries")
#: what stops one step (or one period's destruction) and not the next: the database, a key or period
#: key file, our own refusals. Not a task's time limit (Celery's), which must stop the run.
STEP_FAILURES = (SQLAlchemyError, OSError, ValueError, KeyringError, DecryptionError, DermqError)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepFailure:
    """One failure of a retention step."""

    step: str
    #: the error's type, and our own errors' message (a driver's may hold a statement's values)
    why: str
    #: the period whose key could not be destroyed (``destroy_periods``); None: the step as a whole
    period: str | None = None

    def __str__(self) -> str:
        return f"{self.step}{f', period {self.period}' if self.period else ''} ({self.why})"


def unreachable(exc: BaseException) -> bool:
    """The connection failed or was lost (no SQLSTATE: the server never answered the statement)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) and getattr(exc.orig, "pgcode", None) is None


def _why(exc: Exception) -> str:
    own = isinstance(exc, (DermqError, KeyringError, DecryptionError))  # our messages hold no patient data
    return f"{type(exc).__name__}: {exc}" if own else type(exc).__name__


@dataclass
class Steps:
    """Runs retention's steps each on its own: one that fails is logged, kept, handed to ``on_failure``,
    and the next runs."""

    on_failure: Callable[[StepFailure], None] | None = None
    failures: list[StepFailure] = field(default_factory=list)

    def run(self, name: str, work: Callable[[], T], nothing: T) -> T:
        try:
            return work()
        except STEP_FAILURES as exc:
            if unreachable(exc):
                raise  # the database cannot be reached at all: no step can run, and the run failed
            self.failed(name, exc)
            return nothing

    def failed(self, name: str, exc: Exception, *, period: str | None = None) -> None:
        """``name`` failed with ``exc`` (for ``period`` only, if given: the step went on with the others)."""
        failure = StepFailure(name, _why(exc), period)
        self.failures.append(failure)
        own = isinstance(exc, (DermqError, KeyringError, DecryptionError))
        log.error(
            "a retention step failed; the others still run",
            extra={"event": "retention_step_failed", "step": name, "error": type(exc).__name__}
            | ({"period": period} if period else {})
            | ({"detail": str(exc)} if own else {}),
        )
        if self.on_failure is not None:
            self.on_failure(failure)

    def failed_in(self, name: str) -> Callable[[str, Exception], None]:
        """What step ``name`` calls with a period and its error when that period fails and it goes on."""
        return lambda period, exc: self.failed(name, exc, period=period)
