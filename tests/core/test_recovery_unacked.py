"""The sweeper and messages delivered to a worker but never acknowledged (Redis's ``unacked`` hash):
a recent one is waiting in a live worker (a retry's countdown); an old one may belong to a worker
whose main process was killed, and Redis gives it back only after the visibility timeout."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import update

from core import recovery
from core.config import Settings
from core.db import session_scope
from core.models import Case
from tests import support
from tests.conftest import Tenant, own_database_fixtures
from tests.core.test_recovery import sweeping  # noqa: F401  (the fixture: a database and broker of its own)

pytestmark = pytest.mark.usefixtures("database")

tenant, store_case = own_database_fixtures()


def deliver(client: redis.Redis, delivered_at: float) -> None:
    """Take every waiting classify message into the unacknowledged hash, as a worker's kombu does."""
    for name in [key for key in client.keys("cases*") if client.type(key) == b"list"]:
        while (raw := client.lpop(name)) is not None:
            tag = uuid.uuid4().hex
            client.hset("unacked", tag, json.dumps([json.loads(raw), "cases", "cases"]))
            client.zadd("unacked_index", {tag: delivered_at})


def test_a_queued_case_whose_unacknowledged_message_outlived_the_grace_is_published_again(
    sweeping,  # noqa: F811
    own_database: Settings,
    tenant: Tenant,
    store_case,
) -> None:  # type: ignore[no-untyped-def]
    config, publisher, client = sweeping
    grace = config.requeue_grace_seconds
    held, abandoned = store_case(tenant, b"held"), store_case(tenant, b"abandoned")
    with session_scope(config) as session:
        session.execute(
            update(Case)
            .where(Case.id.in_([held, abandoned]))
            .values(updated_at=datetime.now(UTC) - timedelta(seconds=grace + 5))
        )
    assert support.publish_classify(publisher, abandoned)
    deliver(client, time.time() - grace - 5)  # its worker was killed: Redis holds it for the visibility timeout
    assert support.publish_classify(publisher, held)
    deliver(client, time.time())  # a live worker's retry, waiting out its countdown
    assert recovery.broker_case_ids(client) == {str(held), str(abandoned)}

    with session_scope(config) as session:
        report = recovery.sweep(session, config, publisher, client)
    assert report.republished == [str(abandoned)]
