"""Sending tasks by name, so the API never imports the worker (or torch).

Production code never calls these at a call site: it enqueues a :class:`Task` on its Session with
:func:`core.enqueue.enqueue`, and the Session sends it once its transaction has committed. The
functions here are what that hook (and a test with no transaction of its own) sends with.

If Redis is down a send fails fast (one quick retry, then give up: a refused connection costs
milliseconds, not the seconds of kombu's default reconnect loop), the failure is logged with the
case id only, and the case stays ``queued`` in Postgres, where the sweeper finds it and publishes it
again: Postgres is the source of truth, the broker only a signal. The same holds for completion
callbacks, whose outbox row the sweeper re-publishes. The one exception not taken for a failed send
is a worker task's soft time limit (Celery's ``SoftTimeLimitExceeded``, an ``Exception`` too), which
can come while a broker that does not answer holds the send: it goes on to the task's handler.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from core.config import Settings
from core.models import Priority
from core.queueing import PRIORITY_VALUE, QUEUE_CALLBACKS, QUEUE_CASES, TASK_CALLBACK, TASK_CLASSIFY, common_config

log = logging.getLogger("dermq.publisher")

#: One retry 50 ms later, then give up: the caller has a durable row to fall back on.
FAIL_FAST = {"max_retries": 1, "interval_start": 0.05, "interval_step": 0.05, "interval_max": 0.1}


def make_publisher(settings: Settings) -> Celery:
    app = Celery("dermq-publisher", set_as_current=False)
    app.conf.update(common_config(settings))
    return app


@dataclass(frozen=True, slots=True)
class Task:
    """One message to send: a task name, the case id it takes (its one argument), where it goes, and
    any keyword arguments (name, value) beside it."""

    name: str
    case_id: uuid.UUID
    queue: str
    priority: int | None = None
    kwargs: tuple[tuple[str, object], ...] = ()


def classify_task(case_id: uuid.UUID, priority: Priority | str) -> Task:
    """``classify(case_id)`` on the cases queue at the case's priority."""
    return Task(TASK_CLASSIFY, case_id, QUEUE_CASES, PRIORITY_VALUE[Priority(priority)])


def callback_task(case_id: uuid.UUID, *, turn: bool = False) -> Task:
    """The completion callback of a finished case (its outbox row is written in the same transaction),
    on the callbacks queue, which only the callback workers read (``worker.callbacks_app``). ``turn``:
    the turn at its clinic's receiver that an ended attempt hands it (core.callback_pacing)."""
    return Task(
        TASK_CALLBACK, case_id, QUEUE_CALLBACKS, PRIORITY_VALUE[Priority.ROUTINE], (("turn", True),) if turn else ()
    )


def send(app: Celery, task: Task) -> bool:
    """Send ``task`` now; True on success, False (logged, without PHI) when the broker is unreachable."""
    options: dict[str, object] = {"queue": task.queue}
    if task.priority is not None:
        options["priority"] = task.priority
    try:
        app.send_task(
            task.name,
            args=[str(task.case_id)],
            kwargs=dict(task.kwargs) or None,
            retry=True,
            retry_policy=FAIL_FAST,
            **options,
        )
    except SoftTimeLimitExceeded:  # the task's soft time limit, come while the broker held the send: the
        raise  # task's own handler must see it (swallowed here, the child ran on to its hard limit and was killed)
    except Exception as exc:  # kombu raises OperationalError, redis ConnectionError, OSError...
        log.warning(
            "publish failed; the sweeper will publish it again",
            extra={"case_id": str(task.case_id), "event": "publish_failed", "error": type(exc).__name__},
        )
        return False
    return True
