"""Publishes collected on the Session (core.enqueue): sent once the transaction commits, never when it
rolls back, after the connection went back to the pool; a send is recorded in a transaction of its
own. Against the real database and a private redis-server, whose queues the tests read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import get_engine, session_factory, session_scope
from core.enqueue import enqueue, enqueued
from core.models import Case
from core.publisher import callback_task, classify_task, make_publisher
from core.queueing import QUEUE_CALLBACKS, queue_lists
from core.recovery import broker_case_ids
from tests import support
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def broker(settings: Settings, private_broker) -> Iterator[tuple[Settings, object, redis.Redis]]:  # type: ignore[no-untyped-def]
    config = settings.model_copy(update={"redis_url": private_broker.url})
    client = redis.Redis.from_url(private_broker.url)
    client.flushdb()
    yield config, make_publisher(config), client
    client.close()


class Boom(Exception):
    pass


def test_a_task_is_sent_only_once_its_transaction_commits(
    broker, settings: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    _, publisher, client = broker
    case_id = store_case(tenant, b"queued")
    seen_by_others: list[bool] = []
    with session_scope(settings) as session:
        session.execute(text("UPDATE cases SET updated_at = now() WHERE id = :id"), {"id": case_id})
        enqueue(session, publisher, classify_task(case_id, "routine"))
        session.flush()
        assert enqueued(session) == [classify_task(case_id, "routine")]
        assert broker_case_ids(client) == set()  # the transaction is open: nothing has left

        def visible(other: Session, ids: list[uuid.UUID]) -> None:
            # runs after the send: the message is in Redis and the row it names is committed
            seen_by_others.append(str(case_id) in broker_case_ids(client) and other.get(Case, case_id) is not None)

        enqueue(session, publisher, callback_task(case_id), on_sent=visible)
    assert broker_case_ids(client) == {str(case_id)}
    assert sum(client.llen(name) for name in queue_lists(QUEUE_CALLBACKS)) == 1
    assert seen_by_others == [True]


def test_a_rolled_back_transaction_sends_nothing(broker, settings: Settings, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    _, publisher, client = broker
    case_id = store_case(tenant, b"queued")
    with pytest.raises(Boom), session_scope(settings) as session:
        enqueue(session, publisher, classify_task(case_id, "urgent"))
        session.flush()
        raise Boom
    session = session_factory(settings)()
    enqueue(session, publisher, classify_task(case_id, "urgent"))
    session.execute(select(1))
    session.close()  # closed without a commit
    with session_scope(settings) as later:  # and nothing lingers for the Session's next transaction
        later.execute(select(1))
    assert broker_case_ids(client) == set()


def test_a_rolled_back_savepoint_drops_only_its_tasks(broker, settings: Settings, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    _, publisher, client = broker
    kept, dropped, released = (store_case(tenant, data) for data in (b"kept", b"dropped", b"released"))
    with session_scope(settings) as session:
        enqueue(session, publisher, classify_task(kept, "routine"))
        with pytest.raises(Boom), session.begin_nested():
            enqueue(session, publisher, classify_task(dropped, "routine"))
            raise Boom
        with session.begin_nested():
            enqueue(session, publisher, classify_task(released, "routine"))
    assert broker_case_ids(client) == {str(kept), str(released)}


def test_tasks_are_sent_after_the_connection_went_back_to_the_pool(
    broker, settings: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    _, publisher, client = broker
    case_id = store_case(tenant, b"queued")
    pool = get_engine(settings).pool
    checked_out: list[int] = []

    def count(other: Session, _ids: list[uuid.UUID]) -> None:
        other.execute(select(1))
        checked_out.append(pool.checkedout())  # type: ignore[attr-defined]

    with session_scope(settings) as session:
        session.execute(select(1))
        before = pool.checkedout()  # type: ignore[attr-defined]
        enqueue(session, publisher, classify_task(case_id, "routine"), on_sent=count)
    # The follow-up transaction holds one connection; the committed Session's went back first.
    assert checked_out == [before]
    assert broker_case_ids(client) == {str(case_id)}


def test_a_broker_that_is_down_loses_nothing_the_database_holds(settings: Settings, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{support.free_port()}/0"})
    publisher = make_publisher(dead)
    case_id = store_case(tenant, b"queued")
    recorded: list[list[uuid.UUID]] = []
    with session_scope(settings) as session:
        session.execute(text("UPDATE cases SET priority = 'urgent' WHERE id = :id"), {"id": case_id})
        for _ in range(3):
            enqueue(session, publisher, classify_task(case_id, "routine"), on_sent=lambda _s, ids: recorded.append(ids))
    # The commit stands (the sweeper will publish the case), and no send is recorded as done.
    with session_scope(settings) as session:
        case = session.get(Case, case_id)
        assert (case.priority, case.status, case.published_at) == ("urgent", "queued", None)
    assert recorded == []


def test_publishes_reuse_one_redis_client_and_every_message_arrives(broker) -> None:  # type: ignore[no-untyped-def]
    """The publisher's channel (core.redis_transport) builds one redis.Redis for all its commands,
    where kombu's own built one per command; the messages are kombu's as before."""
    from core import redis_transport

    _config, publisher, client = broker
    ids = [uuid.uuid4() for _ in range(5)]
    clients = set()
    for case_id in ids:
        assert support.publish_classify(publisher, case_id)
        with publisher.producer_or_acquire() as producer:
            assert isinstance(producer.channel, redis_transport.Channel)
            clients.add(id(producer.channel._create_client()))
    assert len(clients) == 1
    assert broker_case_ids(client) == {str(i) for i in ids}


def test_redis_urls_get_the_reusing_transport_and_a_tls_one_verifies_the_server(settings: Settings) -> None:
    from core.queueing import common_config

    assert common_config(settings)["broker_transport"] == "core.redis_transport:Transport"
    assert "broker_use_ssl" not in common_config(settings)
    # TLS (tests/deploy/test_redis_tls.py runs it): the URL's options also as broker_use_ssl, which
    # Flower's broker page reads, and kombu, given none, checked no certificate
    tls = settings.model_copy(update={"redis_url": "rediss://127.0.0.1:6380/0?ssl_ca_certs=/ca.pem"})
    assert common_config(tls)["broker_transport"] == "core.redis_transport:Transport"
    assert common_config(tls)["broker_use_ssl"] == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    socket = settings.model_copy(update={"redis_url": "redis+socket:///run/redis/redis.sock"})
    assert "broker_transport" not in common_config(socket)  # kombu's own
