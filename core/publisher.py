"""Publishing tasks by name, so the API never imports the worker (or torch).

A publish happens only after the transaction that created the case committed. If Redis is down the
publish fails fast (one quick retry, then give up: a refused connection costs milliseconds, not the
seconds of kombu's default reconnect loop) and the case stays ``queued`` in Postgres, where the
sweeper finds it and publishes it again: Postgres is the source of truth, the broker only a signal.
The same holds for completion callbacks, whose outbox row the sweeper re-publishes.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery

from core.config import Settings
from core.models import Priority
from core.queueing import PRIORITY_VALUE, QUEUE_CASES, QUEUE_MAINTENANCE, TASK_CALLBACK, TASK_CLASSIFY, common_config

log = logging.getLogger("dermq.publisher")

#: One retry 50 ms later, then give up: the caller has a durable row to fall back on.
FAIL_FAST = {"max_retries": 1, "interval_start": 0.05, "interval_step": 0.05, "interval_max": 0.1}


def make_publisher(settings: Settings) -> Celery:
    app = Celery("dermq-publisher", set_as_current=False)
    app.conf.update(common_config(settings))
    return app


def _send(app: Celery, name: str, case_id: uuid.UUID | str, **options: Any) -> bool:
    try:
        app.send_task(name, args=[str(case_id)], retry=True, retry_policy=FAIL_FAST, **options)
    except Exception as exc:  # kombu raises OperationalError, redis ConnectionError, OSError...
        log.warning(
            "publish failed; the sweeper will publish it again",
            extra={"case_id": str(case_id), "event": "publish_failed", "error": type(exc).__name__},
        )
        return False
    return True


def publish_classify(app: Celery, case_id: uuid.UUID, priority: Priority | str) -> bool:
    """Queue ``classify(case_id)``; True on success, False (logged) when the broker is unreachable."""
    return _send(app, TASK_CLASSIFY, case_id, queue=QUEUE_CASES, priority=PRIORITY_VALUE[Priority(priority)])


def publish_callback(app: Celery, case_id: uuid.UUID | str) -> bool:
    """Queue the completion callback of a finished case (its outbox row is already committed)."""
    return _send(app, TASK_CALLBACK, case_id, queue=QUEUE_MAINTENANCE)
