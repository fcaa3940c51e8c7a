"""The callback worker: dermq's Celery app, run on threads to deliver completion callbacks only.

    celery -A worker.callbacks_app worker --queues callbacks

A callback attempt waits on a clinic's server (up to three ``callback_timeout_seconds``), not on a
core. On the classification workers it held a prefork child, and the cores that child's model passes
need, for each attempt: behind a clinic whose receiver answered slowly, every clinic's cases waited.
Here the attempts run on ``callback_worker_threads`` threads of one process that never loads the model
(the model's preload is a prefork child's hook), and only this worker needs a route out of the
network (deploy/compose.callbacks.yml, deploy/k8s/networkpolicies.yaml).

Celery's time limits are not enforced on threads; an attempt needs none: each ends three callback
timeouts after it starts, its socket shut down under it (:mod:`worker.callbacks`).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from core.db import get_engine
from worker.celery_app import app
from worker.pipeline import keyring

__all__ = ["app"]

_settings = app.dermq_settings
app.conf.update(
    worker_pool="threads",
    worker_concurrency=_settings.callback_worker_threads,
    # a prefork child's limits: no child here
    worker_max_tasks_per_child=None,
    worker_max_memory_per_child=None,
)


@signals.worker_init.connect
def _shared_before_threads(**_kwargs: Any) -> None:
    # The engine and the keyring are made on first use and kept per process: made here, before the
    # threads start, so that no two threads make one each.
    get_engine(_settings)
    keyring(_settings)
