"""``DERMQ_WORKER_MAX_MEMORY_PER_CHILD_MB``: a worker child whose memory passed the bound is replaced
once its case has ended, and the case it ran is not lost nor run twice; the new child takes the next
case. (A bound of 1 MiB: every child passes it with its first case.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Case, Result
from core.publisher import make_publisher
from tests import processes, support
from tests.conftest import case_store, new_tenant
from tests.worker.test_memory_bombs_worker import children

pytestmark = [pytest.mark.usefixtures("database"), pytest.mark.slow]


def test_a_child_past_its_memory_bound_is_replaced_after_its_case_and_loses_nothing(  # type: ignore[no-untyped-def]
    own_database, keyring, stack_env, stack_dir: Path, private_broker, jpeg_bytes: bytes
) -> None:
    settings, tenant = own_database, new_tenant(own_database, keyring)
    store = case_store(settings, keyring)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_REDIS_URL": private_broker.url,  # no other worker takes these messages
        "DERMQ_WORKER_METRICS_PORT": "0",
        "DERMQ_WORKER_MAX_MEMORY_PER_CHILD_MB": "1",
    }
    worker = processes.start_worker(env, stack_dir / "memory-bound-worker.log", name="memory-bound")
    try:
        (child,) = children(worker.proc.pid)

        def ended(case_id: object) -> Case | None:
            with session_scope(settings) as session:
                case = session.get(Case, case_id)
                return case if case is not None and case.status in ("succeeded", "failed") else None

        def replaced() -> int | None:
            now = children(worker.proc.pid)
            return now[0] if len(now) == 1 and now[0] != child else None

        first = store(tenant, jpeg_bytes)  # one at a time: a child's batch would claim both
        assert support.publish_classify(publisher, first, "routine")
        done = support.wait_for(lambda: ended(first), timeout=120, interval=0.2, what="the first case to end")
        successor = support.wait_for(replaced, timeout=60, interval=0.2, what="the child to be replaced")
        second = store(tenant, jpeg_bytes)
        assert support.publish_classify(publisher, second, "routine")
        later = support.wait_for(lambda: ended(second), timeout=120, interval=0.2, what="the second case to end")
        assert worker.alive(), worker.output()[-2000:]
        assert (done.status, done.attempts) == ("succeeded", 1) and (later.status, later.attempts) == ("succeeded", 1)
        assert successor not in (child, None)
        with session_scope(settings) as session:
            results = list(session.scalars(select(Result.case_id).where(Result.case_id.in_([first, second]))))
        assert sorted(map(str, results)) == sorted(map(str, [first, second]))  # one result each
    finally:
        worker.stop()
