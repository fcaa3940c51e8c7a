"""Publishing tasks by name, so the API never imports the worker (or torch).

A publish happens only after the transaction that created the case committed. If Redis is down the
publish fails fast and the case stays ``queued`` in Postgres, where the sweeper finds it and
publishes it again: Postgres is the source of truth, the broker only a signal.
"""

from __future__ import annotations

import logging
import uuid

from celery import Celery

from core.config import Settings
from core.models import Priority
from core.queueing import PRIORITY_VALUE, QUEUE_CASES, TASK_CLASSIFY, common_config

log = logging.getLogger("dermq.publisher")


def make_publisher(settings: Settings) -> Celery:
    app = Celery("dermq-publisher", set_as_current=False)
    app.conf.update(common_config(settings))
    return app


def publish_classify(app: Celery, case_id: uuid.UUID, priority: Priority | str) -> bool:
    """Queue ``classify(case_id)``; True on success, False (logged) when the broker is unreachable."""
    try:
        app.send_task(
            TASK_CLASSIFY,
            args=[str(case_id)],
            queue=QUEUE_CASES,
            priority=PRIORITY_VALUE[Priority(priority)],
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3},
        )
    except Exception as exc:  # kombu raises OperationalError, redis ConnectionError, OSError...
        log.warning(
            "publish failed; the sweeper will publish the case again",
            extra={"case_id": str(case_id), "error": type(exc).__name__},
        )
        return False
    return True
