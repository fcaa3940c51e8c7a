"""No completion callback announces a case erased, to a clinic deactivated or to a callback removed
before it went out. The attempt leases its delivery, then resolves and connects, with no transaction
open; a case erased meanwhile (by its clinic, an operator or retention), a clinic an administrator
deactivated or a callback the clinic removed got the notice all the same. The attempt
(worker.callbacks.deliver) against the real database, a private redis-server and a real receiver on
127.0.0.1; the erasure is the operator's (core.retention.erase_by_operator), the deactivation the
administrator's (core.clinics.set_active), the removal the clinic's (core.callbacks.unregister), each
made at the moment the test needs it."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core import audit, callback_attempts, callbacks, clinics, keyrotation, retention
from core.callback_signing import SIGNATURE_HEADER, verify
from core.config import Settings
from core.db import session_factory, session_scope
from core.keys import Principal
from core.models import AuditEvent, CallbackDelivery, Case, Clinic, ClinicCallback, Role
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


def _erase(session: Session, tenant: Tenant, case_id: uuid.UUID) -> None:
    retention.erase_by_operator(session, case_id, actor=audit.SYSTEM)


def _deactivate(session: Session, tenant: Tenant, case_id: uuid.UUID) -> None:
    clinics.set_active(session, tenant.clinic_id, False)


def _remove_callback(session: Session, tenant: Tenant, case_id: uuid.UUID) -> None:
    callbacks.unregister(session, principal=Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id), actor=audit.SYSTEM)


#: what stops a callback's notice, and the reason its cancellation is audited with
WITHDRAWALS = [(_erase, "case_erased"), (_deactivate, "clinic_inactive"), (_remove_callback, "callback_removed")]


def _register(settings: Settings, keyring, tenant: Tenant, url: str) -> str:  # type: ignore[no-untyped-def]
    """The clinic registers its callback again, at ``url`` (committed); returns the new secret."""
    with session_scope(settings) as session:
        principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
        _, secret = callbacks.register(
            session, keyring=keyring, settings=settings, principal=principal, actor=audit.SYSTEM, url=url
        )
    return secret


def _deliveries_audited(settings: Settings, case_id: uuid.UUID) -> list[dict[str, object]]:
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(AuditEvent.detail)
                .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "callback.deliver")
                .order_by(AuditEvent.id)
            )
        )


@pytest.mark.parametrize(("withdraw", "reason"), WITHDRAWALS, ids=[reason for _, reason in WITHDRAWALS])
def test_a_callback_withdrawn_after_it_was_leased_sends_nothing(
    settings: Settings,
    private_broker,
    keyring,
    tenant: Tenant,
    store_case,
    receiver: Receiver,
    monkeypatch,
    withdraw,
    reason,
) -> None:  # type: ignore[no-untyped-def]
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    resolve = delivery.checked_address

    def withdrawn_while_resolving(host: str, port: int, config: Settings) -> str:
        with session_scope(settings) as session:  # committed after the lease, before the request is sent
            withdraw(session, tenant, case_id)
        return resolve(host, port, config)

    monkeypatch.setattr(delivery, "checked_address", withdrawn_while_resolving)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert delivery.deliver(settings, keyring, case_id, publisher=publisher) == callback_attempts.Delivery(
        "cancelled", 0
    )
    assert receiver.calls == []  # nothing reached the clinic's receiver
    with session_scope(settings) as session:
        row = session.get(CallbackDelivery, case_id)
        assert row is not None
        # settled as a cancellation at the lease is: no attempt made, nothing pending, the reason audited
        assert (row.status, row.attempts, row.leased_until) == ("cancelled", 0, None)
    assert _deliveries_audited(settings, case_id) == [{"error": "cancelled", "reason": reason}]


@pytest.mark.parametrize(("withdraw", "reason"), WITHDRAWALS, ids=[reason for _, reason in WITHDRAWALS])
def test_a_withdrawal_that_comes_while_the_notice_is_sent_waits_until_it_is_out(
    settings: Settings,
    private_broker,
    keyring,
    tenant: Tenant,
    store_case,
    receiver: Receiver,
    monkeypatch,
    withdraw,
    reason,
) -> None:  # type: ignore[no-untyped-def]
    # A last look that only read the rows would let an erasure, a deactivation or the callback's
    # removal commit between that look and the request: a notice withdrawn a moment before went out.
    # The look holds them until the request is handed to the socket; the withdrawal then waits for it
    # (and the notice went out before it).
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    withdrawer_pid: list[int] = []
    withdrawn = threading.Event()

    def withdrawal() -> None:
        with session_scope(settings) as session:
            withdrawer_pid.append(session.scalar(text("SELECT pg_backend_pid()")))
            withdraw(session, tenant, case_id)
        withdrawn.set()

    withdrawer = threading.Thread(target=withdrawal)
    withdrawal_waited: list[bool] = []
    send = delivery._PinnedHTTPConnection.request

    def request_while_a_withdrawal_comes(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        withdrawer.start()
        with contextlib.suppress(TimeoutError):  # (raised here, post would take it for a network error)
            support.wait_for(
                lambda: withdrawn.is_set() or (withdrawer_pid and _waiting_for_a_lock(settings, withdrawer_pid[0])),
                timeout=30,
                interval=0.02,
                what=f"the withdrawal ({reason}) to end or to wait for a lock",
            )
        withdrawal_waited.append(not withdrawn.is_set())
        return send(self, *args, **kwargs)

    monkeypatch.setattr(delivery._PinnedHTTPConnection, "request", request_while_a_withdrawal_comes)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    done = delivery.deliver(settings, keyring, case_id, publisher=publisher)
    withdrawer.join(timeout=30)
    assert withdrawal_waited == [True]  # it did not commit while the request was being sent
    assert (done.outcome, len(receiver.calls)) == ("delivered", 1)  # the news, before the withdrawal
    assert withdrawn.is_set()  # then the withdrawal went ahead
    with session_scope(settings) as session:
        withdrawn_as = {
            "case_erased": lambda: session.scalar(select(Case.status).where(Case.id == case_id)) == "purged",
            "clinic_inactive": lambda: (
                session.scalar(select(Clinic.active).where(Clinic.id == tenant.clinic_id)) is False
            ),
            "callback_removed": lambda: session.get(ClinicCallback, tenant.clinic_id) is None,
        }
        assert withdrawn_as[reason]()


def _waiting_for_a_lock(settings: Settings, pid: int) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted"), {"pid": pid})
        )


def test_a_key_rotation_while_a_notice_is_sent_rewraps_its_secret(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, receiver: Receiver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The last look holds the clinic's callback while the request is written; a rotation's re-wrap of the
    # secrets (SKIP LOCKED) passed the row by for the whole run, and `dermq keys rewrap` ended with one
    # row left under the old key. The re-wrap is rolled back: the shared database keeps its secrets.
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    rotated = keyring.with_new_active_key()
    rewrapped: list[str] = []
    send = delivery._PinnedHTTPConnection.request

    def request_while_rotating(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with session_factory(settings)() as session:
            try:
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                after = None  # as keyrotation.rewrap_all walks them, a batch at a time
                while (batch := keyrotation._secret_batch(session, rotated, after=after, limit=1000)) is not None:
                    session.flush()
                    after = batch.last
                callback = session.get(ClinicCallback, tenant.clinic_id)
                assert callback is not None
                rewrapped.append(callback.kek_id)
            finally:
                session.rollback()
        return send(self, *args, **kwargs)

    monkeypatch.setattr(delivery._PinnedHTTPConnection, "request", request_while_rotating)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    done = delivery.deliver(settings, keyring, case_id, publisher=publisher)
    assert (done.outcome, len(receiver.calls)) == ("delivered", 1)
    assert rewrapped == [rotated.active_id]  # re-wrapped while the notice went out, not passed by


def test_a_callback_registered_again_after_it_was_leased_goes_to_the_new_registration(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, receiver: Receiver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # A clinic moves its callback to a new receiver (the old one is retired, or no longer trusted) while
    # an attempt, leased with the old URL and secret, resolves and connects: the notice went to the old
    # receiver all the same. It goes to none then; the attempt is given back, and the next lease (the
    # message's, at once) sends it to the new receiver, signed with the new secret.
    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    moved_to = Receiver([])
    new_secret: list[str] = []
    resolve = delivery.checked_address

    def registered_again_while_resolving(host: str, port: int, config: Settings) -> str:
        if not new_secret:  # committed after the lease, before the request is sent
            new_secret.append(_register(settings, keyring, tenant, moved_to.url))
        return resolve(host, port, config)

    monkeypatch.setattr(delivery, "checked_address", registered_again_while_resolving)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    try:
        first = delivery.deliver(settings, keyring, case_id, publisher=publisher)
        assert first == callback_attempts.Delivery("reregistered", 0)
        assert (receiver.calls, moved_to.calls) == ([], [])  # nothing sent to either
        with session_scope(settings) as session:
            row = session.get(CallbackDelivery, case_id)
            assert row is not None  # still to do, no attempt counted, no lease held
            assert (row.status, row.attempts, row.leased_until) == ("pending", 0, None)
        again = delivery.deliver(settings, keyring, case_id, publisher=publisher)  # the message, taken again
        assert (again.outcome, again.attempt) == ("delivered", 1)
        assert receiver.calls == [] and len(moved_to.calls) == 1
        call = moved_to.calls[0]
        headers = call["headers"]
        assert isinstance(headers, dict) and isinstance(call["body"], bytes)
        assert verify(new_secret[0], headers[SIGNATURE_HEADER], call["body"])
    finally:
        moved_to.close()
    # the trail: no cancellation, one delivery, to the new receiver's host
    assert _deliveries_audited(settings, case_id) == [{"attempt": 1, "http_status": 204, "host": "127.0.0.1"}]


def test_the_message_of_an_attempt_whose_callback_was_registered_again_takes_it_again_at_once(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, receiver: Receiver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The callback task itself (run eagerly: its retry too): no wait for a backoff or for the sweeper.
    from worker import callback_tasks

    case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case, url=receiver.url)
    moved_to = Receiver([])
    resolve = delivery.checked_address
    looks: list[str] = []

    def registered_again_while_resolving(host: str, port: int, config: Settings) -> str:
        looks.append(host)
        if len(looks) == 1:
            _register(settings, keyring, tenant, moved_to.url)
        return resolve(host, port, config)

    monkeypatch.setattr(delivery, "checked_address", registered_again_while_resolving)
    # this test's settings and keys, for the task that reads the worker's own
    monkeypatch.setattr(callback_tasks, "settings", lambda: settings)
    monkeypatch.setattr(callback_tasks, "keyring", lambda _config: keyring)
    try:
        assert callback_tasks.deliver_callback.apply(args=[str(case_id)]).get() == "delivered"
        assert receiver.calls == [] and len(moved_to.calls) == 1
    finally:
        moved_to.close()
    assert len(looks) == 2  # the attempt that found the callback moved, then the one that sent the notice
