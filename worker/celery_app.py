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
import os
import tempfile
from typing import Any, NoReturn

from celery import Celery, signals

from core.config import Settings, get_settings
from core.db import dispose_engines
from core.logs import configure_logging
from core.queueing import (
    QUEUE_CASES,
    QUEUE_MAINTENANCE,
    TASK_AUDIT_CHECK,
    TASK_AUDIT_SEAL,
    TASK_DRIFT,
    TASK_FIELD,
    TASK_PURGE,
    TASK_SWEEP,
    common_config,
)
from worker.runtime import worker_concurrency
from worker.withheld import WithholdingTask

#: how often beat has the field performance on confirmed outcomes recomputed (dermq_field_* gauges)
FIELD_INTERVAL_SECONDS = 900.0


#: The periodic tasks go to the maintenance queue at Redis priority 0, ahead of everything else a
#: classification worker reads: behind a backlog (once of callbacks to a clinic's slow endpoint, which
#: have a queue of their own now, core.queueing.QUEUE_CALLBACKS) the sweeper and the audit sealer
#: waited until their messages expired, and no case was recovered meanwhile.
PERIODIC = {"queue": QUEUE_MAINTENANCE, "priority": 0}

#: How late a periodic task may still start, beyond its interval: beat stamps the expiry by its own
#: clock and a worker compares it with its own, so an expiry of one interval made a worker whose clock
#: ran 30 s ahead of beat's drop every sweep (and 1 s ahead, every seal), and a sweep queued behind a
#: purge on a one-child worker expired. A fixed slack, not a whole interval more: after a stall, at most
#: one extra message of each hourly task is still valid (a drift report opens a day of findings).
EXPIRY_SLACK_SECONDS = 60.0


def expiry(interval: float) -> float:
    """Seconds after beat sends a periodic task that a worker still runs it: its interval and a minute."""
    return interval + EXPIRY_SLACK_SECONDS


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        **common_config(settings),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": worker_concurrency(settings),
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child,
        "worker_max_memory_per_child": settings.worker_max_memory_per_child_mb * 1024 or None,  # KiB
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # A broker connection lost while a case runs does not stop it (Celery's default would SIGTERM the
        # child): Postgres holds the case, its claim and its result, fenced by the attempt, so the case
        # finishes on this attempt; a redelivered message then finds it finished and does nothing.
        # Killing it would cost the case an attempt and wait for the sweeper (the time limit and grace).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_proc_alive_timeout": 30.0,
        "beat_schedule": {
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {**PERIODIC, "expires": expiry(settings.sweep_interval_seconds)},
            },
            "drift": {
                "task": TASK_DRIFT,
                "schedule": 3600.0,
                "options": {**PERIODIC, "expires": expiry(3600.0)},
            },
            "field-performance": {
                "task": TASK_FIELD,
                "schedule": FIELD_INTERVAL_SECONDS,
                "options": {**PERIODIC, "expires": expiry(FIELD_INTERVAL_SECONDS)},
            },
            "audit-seal": {
                "task": TASK_AUDIT_SEAL,
                "schedule": settings.audit_seal_interval_seconds,
                "options": {**PERIODIC, "expires": expiry(settings.audit_seal_interval_seconds)},
            },
            "audit-check": {
                "task": TASK_AUDIT_CHECK,
                "schedule": 60.0,
                "options": {**PERIODIC, "expires": expiry(60.0)},
            },
            "purge": {
                "task": TASK_PURGE,
                "schedule": settings.purge_interval_seconds,
                "options": {**PERIODIC, "expires": expiry(settings.purge_interval_seconds)},
            },
        },
        "task_queues_names": [QUEUE_CASES, QUEUE_MAINTENANCE],
    }


class DermqCelery(Celery):
    """The Celery app, holding dermq's settings beside its configuration, not in it: ``conf`` is what
    ``celery inspect conf`` and Flower's worker page show, and Celery masks only names that look
    secret, so settings kept there showed the database's and Redis's URLs with their passwords."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dermq_settings = settings


def create_app(settings: Settings) -> DermqCelery:
    celery = DermqCelery(settings, "dermq", include=["worker.tasks"], task_cls=WithholdingTask)
    config = celery_config(settings)
    config.pop("task_queues_names")
    celery.conf.update(config)
    return celery


app = create_app(get_settings())


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, component="worker")


def prepare_multiprocess_dir() -> str:
    """Point prometheus_client at a folder shared by the worker and its children (before it is imported)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="dermq-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # The celery command may have imported prometheus_client already (Flower's CLI plugin does),
    # choosing in-memory values: switch to file-backed ones before any dermq metric is created.
    import prometheus_client.values

    prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()
    return folder


@signals.celeryd_init.connect
def _worker_starting(**_kwargs: Any) -> None:
    # Only worker processes get here (not beat, Flower or the API publishing tasks).
    prepare_multiprocess_dir()


@signals.worker_init.connect
def _refuse_insecure_login(**_kwargs: Any) -> None:
    # Production: a worker logged in as the audit tables' owner (or a superuser) could rewrite the
    # trail; refuse to start (core.db_roles), as the API does, and where the login cannot be checked
    # (Postgres unreachable) too. Beat never connects to the database. Celery logs an exception that a
    # signal's receiver raises and goes on, so the worker started all the same: SystemExit is not an
    # Exception, and ends the worker with the reason.
    from core import db_roles

    try:
        db_roles.refuse_insecure_login(get_settings())
    except db_roles.InsecureLoginError as exc:
        reason = str(exc)
    except Exception as exc:  # any failure of the check is a check not passed
        reason = f"refusing to start: the database login could not be checked ({type(exc).__name__})"
    else:
        return
    _refuse_to_start(reason)


@signals.worker_init.connect
def _refuse_an_unpinned_model(sender: Any = None, **_kwargs: Any) -> None:
    # A worker that takes cases serves the manifest DERMQ_MODEL_SHA256 pins (production requires a pin),
    # or does not start: its children would fail every case they claimed. The callback worker loads no
    # model. SystemExit, as above: Celery ignores a receiver's exceptions.
    consumed = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    if consumed is None or QUEUE_CASES not in consumed.consume_from:
        return
    from ml.registry import RegistryError
    from worker.runtime import check_model_pin

    try:
        check_model_pin(get_settings())
    except RegistryError as exc:
        _refuse_to_start(f"refusing to start: {exc}")


def _refuse_to_start(reason: str) -> NoReturn:
    """End the worker from a ``worker_init`` receiver, saying why (logged, and on stderr)."""
    logging.getLogger("dermq.worker").critical(reason, extra={"event": "refused_to_start"})
    raise SystemExit(reason) from None


@signals.worker_init.connect
def _settle_heap(**_kwargs: Any) -> None:
    # Before the pool forks: the children inherit a heap no collection walks (core.heap); each
    # settles again once its model has loaded (worker.runtime.preload).
    from core import heap

    heap.settle("worker")


@signals.worker_init.connect
def _serve_metrics(**_kwargs: Any) -> None:
    from worker import metrics

    settings = get_settings()
    metrics.serve(settings.metrics_host, settings.worker_metrics_port)


@signals.worker_process_shutdown.connect
def _child_exiting(pid: int | None = None, **_kwargs: Any) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from worker import metrics

        metrics.child_exited(pid or os.getpid())


@signals.worker_shutdown.connect
def _worker_stopped(**_kwargs: Any) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from worker import metrics

        metrics.cleanup()


@signals.worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # Connections inherited from the parent must not be shared with it. The model loads in a
    # background thread of this child (never in the parent: CUDA is not fork-safe), so the hook
    # itself returns at once and the first case does not pay for the load.
    dispose_engines()
    settings = get_settings()
    if settings.preload_model:
        from worker import runtime

        runtime.preload(settings)
    logging.getLogger("dermq.worker").info("worker process ready", extra={"event": "process_init"})
