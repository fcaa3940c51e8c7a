"""The queue topology shared by the API's publisher and the Celery worker: names, priorities, and the
Redis transport options (which must agree between every app on one broker: the shortest
visibility timeout wins).
"""

from __future__ import annotations

from typing import Any

from core import connection_urls, redis_transport
from core.config import Settings
from core.models import Priority

TASK_CLASSIFY = "dermq.classify"
TASK_SWEEP = "dermq.sweep"
TASK_PURGE = "dermq.purge"
TASK_DRIFT = "dermq.drift"
TASK_FIELD = "dermq.field_performance"
TASK_AUDIT_CHECK = "dermq.audit_check"
TASK_AUDIT_SEAL = "dermq.audit_seal"
TASK_CALLBACK = "dermq.callback"

#: Redis keys of operational state (no patient data): the latest drift report, the latest field
#: performance report (aggregates per model and class) and the audit check's outcome for the metrics
#: gauges (the results are kept in Postgres, audit_verifications; where the check resumes, beside the
#: witness file).
DRIFT_KEY = "dermq:drift:latest"
FIELD_KEY = "dermq:field:latest"
AUDIT_CHECK_KEY = "dermq:audit:check"

QUEUE_CASES = "cases"
QUEUE_MAINTENANCE = "maintenance"
#: Completion callbacks, read by a worker of their own (``worker.callbacks_app``: threads, no model).
#: A callback waits on a clinic's server, up to three callback timeouts an attempt: on the
#: classification workers' maintenance queue, a slow receiver held a prefork child (and the cores its
#: model passes need) for each attempt, and classification of every clinic's cases waited behind it.
QUEUE_CALLBACKS = "callbacks"

#: Redis priorities: 0 is served first. Celery keeps one Redis list per step: ``cases`` for 0 and
#: ``cases\x06\x16<n>`` for the others; anything that measures queue length must count them all. A
#: worker reads them step by step, and within a step queue by queue in its ``--queues`` order
#: (``cases,maintenance``): the periodic tasks (the sweeper, the sealer: ``worker.celery_app.PERIODIC``,
#: 0) come first, then urgent cases (3) and routine cases (6). (Completion callbacks, routine, have a
#: queue and workers of their own: ``QUEUE_CALLBACKS``.)
#: With urgent cases at 0 too, a surge of them kept the sweeper and the sealer waiting until their
#: messages expired. Urgent messages published at 0 by an older release are still served first.
PRIORITY_STEPS = [0, 3, 6, 9]
PRIORITY_VALUE = {Priority.URGENT: 3, Priority.ROUTINE: 6}
REDIS_PRIORITY_SEP = "\x06\x16"


def queue_lists(queue: str = QUEUE_CASES) -> list[str]:
    """Every Redis list that holds messages of ``queue``, one per priority step."""
    return [queue if step == 0 else f"{queue}{REDIS_PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "visibility_timeout": settings.broker_visibility_timeout,
        "priority_steps": PRIORITY_STEPS,
        "sep": REDIS_PRIORITY_SEP,
        "queue_order_strategy": "priority",
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        "retry_on_timeout": True,
    }


ROUTES = {
    TASK_CLASSIFY: {"queue": QUEUE_CASES},
    TASK_SWEEP: {"queue": QUEUE_MAINTENANCE},
    TASK_PURGE: {"queue": QUEUE_MAINTENANCE},
    TASK_DRIFT: {"queue": QUEUE_MAINTENANCE},
    TASK_FIELD: {"queue": QUEUE_MAINTENANCE},
    TASK_AUDIT_CHECK: {"queue": QUEUE_MAINTENANCE},
    TASK_AUDIT_SEAL: {"queue": QUEUE_MAINTENANCE},
    # Callbacks wait on clinics' servers: never on a worker that classifies.
    TASK_CALLBACK: {"queue": QUEUE_CALLBACKS},
}


def common_config(settings: Settings) -> dict[str, Any]:
    """Celery settings every dermq app on the broker shares (publisher and worker alike). A ``rediss://``
    broker's TLS options go to ``broker_use_ssl`` too (:func:`core.connection_urls.redis_tls`)."""
    tls = connection_urls.redis_tls(settings.broker_url)
    return {
        "broker_url": settings.broker_url,
        **(
            {"broker_transport": redis_transport.NAME}
            if settings.broker_url.startswith(("redis://", "rediss://"))
            else {}
        ),
        **({"broker_use_ssl": tls} if tls is not None else {}),
        "broker_transport_options": transport_options(settings),
        "broker_connection_timeout": 2,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_routes": ROUTES,
        "task_default_queue": QUEUE_CASES,
        "task_default_priority": PRIORITY_VALUE[Priority.ROUTINE],
        "timezone": "UTC",
        "enable_utc": True,
    }
