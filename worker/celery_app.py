"""The Celery app and all of its configuration, fed from dermq's Settings.

    celery -A worker.celery_app worker --queues cases,maintenance   # classification + maintenance
    celery -A worker.celery_app beat                                # the periodic sweeper and purge
    celery -A worker.celery_app flower                              # the operators' queue view

JSON only; results live in Postgres (no result backend); ``acks_late`` with
``task_reject_on_worker_lost`` so a killed child's message comes back; prefetch 1 so nothing waits
behind a long job; soft limit < hard limit < Redis visibility timeout (Settings refuses anything
else). Importing this module does not import torch: the model loads in each child process, after
the fork, on its first case.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from core.config import Settings, get_settings
from core.db import dispose_engines
from core.logs import configure_logging
from core.queueing import QUEUE_CASES, QUEUE_MAINTENANCE, TASK_PURGE, TASK_SWEEP, common_config


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        **common_config(settings),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_proc_alive_timeout": 30.0,
        "beat_schedule": {
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.sweep_interval_seconds},
            },
            "purge": {
                "task": TASK_PURGE,
                "schedule": settings.purge_interval_seconds,
                "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.purge_interval_seconds},
            },
        },
        "task_queues_names": [QUEUE_CASES, QUEUE_MAINTENANCE],
    }


def create_app(settings: Settings) -> Celery:
    celery = Celery("dermq", include=["worker.tasks"])
    config = celery_config(settings)
    config.pop("task_queues_names")
    celery.conf.update(config)
    celery.conf.dermq_settings = settings
    return celery


app = create_app(get_settings())


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, component="worker")


@signals.worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # Cheap on purpose: connections inherited from the parent must not be shared with it. The model
    # loads on the child's first case (CUDA must never be touched before the fork).
    dispose_engines()
    logging.getLogger("dermq.worker").info("worker process ready", extra={"event": "process_init"})
