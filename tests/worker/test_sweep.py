"""The recovery sweep with the real worker: a case requeued by the sweeper is classified within seconds
of the sweep's commit, not after another ``requeue_grace_seconds``."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from core import recovery
from core.config import Settings
from core.db import session_scope
from core.models import Case
from tests import support
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")

#: far enough in the past that only this test's case is stuck, with grace periods this long
LONG = 10**6


def test_a_swept_case_is_classified_within_seconds(
    worker, tenant: Tenant, store_case, publisher, redis_client, settings: Settings, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    # Long grace periods: this sweep touches no case of another test, only one stuck for weeks.
    config = settings.model_copy(update={"running_grace_seconds": LONG, "requeue_grace_seconds": LONG})
    case_id = store_case(tenant, jpeg_bytes)
    with session_scope(settings) as session:  # claimed by a worker that died a long time ago
        session.execute(
            update(Case)
            .where(Case.id == case_id)
            .values(status="running", attempts=1, started_at=datetime.now(UTC) - timedelta(seconds=2 * LONG))
        )
    with session_scope(config) as session:
        report = recovery.sweep(session, config, publisher, redis_client)
        assert report.requeued == [str(case_id)]
        # The sweep's transaction stays open a while (a slow sweep): a message sent before its commit
        # would reach the worker now, find the case still running and be used up for nothing.
        time.sleep(2)
    committed = time.monotonic()
    assert report.republished == [str(case_id)]
    case = support.wait_for(
        lambda: (c := case_row(settings, case_id)).status in ("succeeded", "failed") and c,
        timeout=settings.requeue_grace_seconds / 2,
        interval=0.2,
        what="the swept case to be classified",
    )
    assert (case.status, case.attempts) == ("succeeded", 2)
    assert time.monotonic() - committed < settings.requeue_grace_seconds / 2


def case_row(settings: Settings, case_id: uuid.UUID) -> Case:
    with session_scope(settings) as session:
        case = session.get(Case, case_id)
        assert case is not None
        return case
