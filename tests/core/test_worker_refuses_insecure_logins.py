"""A classification or callback worker in production refuses to start logged in as the audit tables'
owner or a superuser, as the API does (docs/SECURITY.md, "Database roles"). The check ran in Celery's
``worker_init`` signal, whose receivers' exceptions Celery logs and ignores: the worker started all
the same, ready for cases, with a login that could rewrite the audit trail."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from ml import registry
from tests import processes, support


def _production(stack_env: dict[str, str], login: Settings, broker: Any) -> dict[str, str]:
    return {
        **stack_env,
        "DERMQ_ENVIRONMENT": "production",
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "false",
        "DERMQ_DATABASE_URL": login.database_url,
        "DERMQ_REDIS_URL": broker.url,  # a broker of this module's own: no other test's cases
        "DERMQ_PRELOAD_MODEL": "false",
        "DERMQ_WORKER_METRICS_PORT": str(support.free_port()),
        "DERMQ_MODEL_SHA256": registry.manifest_sha256(registry.DEFAULT_MODEL),  # production pins its model
    }


@pytest.mark.parametrize("app", ["worker.celery_app", "worker.callbacks_app"])
def test_a_worker_refuses_to_start_as_the_owner_or_a_superuser_in_production(  # type: ignore[no-untyped-def]
    roles_db, stack_env, private_broker, tmp_path: Path, app: str
) -> None:
    for login, why in (("owner", "owns the audit table"), ("superuser", "is a superuser")):
        env = _production(stack_env, roles_db[login], private_broker)
        command = [str(support.VENV_BIN / "celery"), "-A", app, "worker", "--pool", "solo", "--queues", "cases"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0, f"{login}: the worker started:\n{done.stderr[-2000:]}"
        assert "refusing to start" in done.stderr and why in done.stderr, done.stderr[-2000:]
    # the runtime role's worker starts, in the same production settings, and takes tasks
    env = _production(stack_env, roles_db["runtime"], private_broker)
    worker = processes.start_worker(env, tmp_path / "worker.log", app=app, queues="cases")
    try:
        assert worker.ping()
    finally:
        worker.stop()
