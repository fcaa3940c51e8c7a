"""No completion callback announces a case erased before it went out. The attempt leases its delivery,
then resolves and connects, with no transaction open; a case erased meanwhile (by its clinic, an
operator or retention) was announced all the same. The attempt (worker.callbacks.deliver) against the
real database, a private redis-server and a real receiver on 127.0.0.1; the erasure is the operator's
(core.retention.erase_by_operator), made at the moment the test needs it."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from core import audit, callback_attempts, retention
from core.config import Settings
from core.db import session_scope
from core.models import AuditEvent, CallbackDelivery, Case
from core.publisher import make_publisher
from tests import support
from tests.api.test_callbacks import Receiver
from tests.conftest import Tenant
from tests.core.test_callback_outbox import pending_delivery
from worker import callbacks as delivery

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([])
    yield server
    server.close()


def _erase(settings: Settings, case_id: uuid.UUID) -> None:
    with session_scope(settings) as session:
        retention.erase_by_operator(session, case_id, actor=audit.SYSTEM)


def _deliveries_audited(settings: Settings, case_id: uuid.UUID) -> list[dict[str, object]]:
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(AuditEvent.detail)
                .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "callback.deliver")
                .order_by(AuditEvent.id)
            )
        )


def test_a_case_erased_after_its_callback_was_leased_is_not_announced(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, receiver: Receiver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    resolve = delivery.checked_address

    def erased_while_resolving(host: str, port: int, config: Settings) -> str:
        _erase(settings, case_id)  # committed after the lease read the case, before the request is sent
        return resolve(host, port, config)

    monkeypatch.setattr(delivery, "checked_address", erased_while_resolving)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert delivery.deliver(settings, keyring, case_id, publisher=publisher) == callback_attempts.Delivery(
        "cancelled", 0
    )
    assert receiver.calls == []  # nothing about the erased case reached the clinic
    with session_scope(settings) as session:
        row = session.get(CallbackDelivery, case_id)
        assert row is not None
        # settled as a cancellation at the lease is: no attempt made, nothing pending, the reason audited
        assert (row.status, row.attempts, row.leased_until) == ("cancelled", 0, None)
    assert _deliveries_audited(settings, case_id) == [{"error": "cancelled", "reason": "case_erased"}]


def test_an_erasure_that_comes_while_the_notice_is_sent_waits_until_it_is_out(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, receiver: Receiver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # A last look at the case that only read it would let an erasure commit between that look and the
    # request: the notice of a case erased a moment before. The look holds the case until the request
    # is handed to the socket; an erasure then waits for it (and the notice went out before it).
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    eraser_pid: list[int] = []
    erased = threading.Event()

    def erase() -> None:
        with session_scope(settings) as session:
            eraser_pid.append(session.scalar(text("SELECT pg_backend_pid()")))
            retention.erase_by_operator(session, case_id, actor=audit.SYSTEM)
        erased.set()

    eraser = threading.Thread(target=erase)
    erasure_waited: list[bool] = []
    send = delivery._PinnedHTTPConnection.request

    def request_while_an_erasure_comes(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        eraser.start()
        with contextlib.suppress(TimeoutError):  # (raised here, post would take it for a network error)
            support.wait_for(
                lambda: erased.is_set() or (eraser_pid and _waiting_for_a_lock(settings, eraser_pid[0])),
                timeout=30,
                interval=0.02,
                what="the erasure to end or to wait for a lock",
            )
        erasure_waited.append(not erased.is_set())
        return send(self, *args, **kwargs)

    monkeypatch.setattr(delivery._PinnedHTTPConnection, "request", request_while_an_erasure_comes)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    done = delivery.deliver(settings, keyring, case_id, publisher=publisher)
    eraser.join(timeout=30)
    assert erasure_waited == [True]  # it did not commit while the request was being sent
    assert (done.outcome, len(receiver.calls)) == ("delivered", 1)  # the news, before the erasure
    assert erased.is_set()  # then the erasure went ahead
    with session_scope(settings) as session:
        case = session.get(Case, case_id)
        assert case is not None and case.status == "purged"


def _waiting_for_a_lock(settings: Settings, pid: int) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted"), {"pid": pid})
        )
