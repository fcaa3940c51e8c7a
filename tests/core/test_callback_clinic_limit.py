"""The per-clinic limit on callback attempts under way (``callback_clinic_concurrency``), against the
real database: a clinic whose attempts fill it gets its further callbacks deferred, uncounted, while
other clinics' are leased; the count is taken under a lock on the clinic, so two workers leasing at
once cannot both pass it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError

from core import callback_attempts, callback_pacing
from core.callback_pacing import Busy
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery
from core.publisher import make_publisher
from core.queueing import QUEUE_CALLBACKS, queue_lists
from tests import support
from tests.conftest import Tenant
from tests.core.test_callback_outbox import lease, pending_delivery, record, row

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def one_at_a_time(settings: Settings) -> Settings:
    return settings.model_copy(update={"callback_clinic_concurrency": 1})


def test_a_clinics_callback_waits_while_its_receiver_has_its_fill_of_attempts(
    one_at_a_time: Settings, private_broker, keyring, make_key, store_case
) -> None:  # type: ignore[no-untyped-def]
    slow: Tenant = make_key("clinic")
    first, second = (pending_delivery(one_at_a_time, private_broker, keyring, slow, store_case) for _ in range(2))
    other = pending_delivery(one_at_a_time, private_broker, keyring, make_key("clinic"), store_case)
    held = lease(one_at_a_time, keyring, first)
    assert isinstance(held, callback_attempts.Lease)
    before = row(one_at_a_time, second).updated_at

    assert lease(one_at_a_time, keyring, second) == Busy(1, 0)
    waiting = row(one_at_a_time, second)
    # nothing attempted, nothing counted, nothing held; not touched (the clinic's status lists its
    # deliveries by their last attempt)
    assert (waiting.status, waiting.attempts, waiting.leased_until) == ("pending", 0, None)
    assert waiting.updated_at == before
    # another clinic's callback is not held up by this one's
    assert isinstance(lease(one_at_a_time, keyring, other), callback_attempts.Lease)
    # the limit is the setting's: two at once are allowed where it says two
    assert isinstance(
        lease(one_at_a_time.model_copy(update={"callback_clinic_concurrency": 2}), keyring, second),
        callback_attempts.Lease,
    )


def test_the_clinics_turn_comes_when_an_attempt_ends_or_its_lease_runs_out(
    one_at_a_time: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    first, second, third = (
        pending_delivery(one_at_a_time, private_broker, keyring, tenant, store_case) for _ in range(3)
    )
    held = lease(one_at_a_time, keyring, first)
    assert isinstance(held, callback_attempts.Lease)
    assert isinstance(lease(one_at_a_time, keyring, second), Busy)
    assert record(one_at_a_time, held, 204).outcome == "delivered"  # the attempt under way ends
    taken = lease(one_at_a_time, keyring, second)
    assert isinstance(taken, callback_attempts.Lease) and taken.attempt == 1
    with session_scope(one_at_a_time) as session:  # its worker died mid-POST: the lease runs out
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.case_id == second)
            .values(leased_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert isinstance(lease(one_at_a_time, keyring, third), callback_attempts.Lease)  # a dead lease holds no turn


def test_two_workers_leasing_one_clinics_callbacks_at_once_do_not_both_pass_the_limit(
    one_at_a_time: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    first, second = (pending_delivery(one_at_a_time, private_broker, keyring, tenant, store_case) for _ in range(2))
    answers: list[object] = []
    with session_scope(one_at_a_time) as session:  # one worker's lease, not committed yet
        held = callback_attempts.lease(session, settings=one_at_a_time, keyring=keyring, case_id=first)
        assert isinstance(held, callback_attempts.Lease)
        other = threading.Thread(target=lambda: answers.append(lease(one_at_a_time, keyring, second)))
        other.start()
        # the other worker's lease waits for the clinic's lock (it would count no attempt under way
        # yet, and lease the second callback too)
        support.wait_for(lambda: _waiting_for_a_clinic_lock(one_at_a_time), timeout=30, what="the second lease to wait")
        assert answers == []
    other.join(timeout=30)
    assert answers == [Busy(1, 0)]
    assert row(one_at_a_time, second).attempts == 0


def _waiting_for_a_clinic_lock(settings: Settings) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :cls AND NOT granted"),
                {"cls": callback_pacing.CLINIC_LOCK},
            )
        )


def test_an_attempt_that_ends_hands_its_turn_to_the_clinics_oldest_waiting_callback(
    one_at_a_time: Settings, private_broker, keyring, make_key, store_case
) -> None:  # type: ignore[no-untyped-def]
    clinic: Tenant = make_key("clinic")
    first, older, newer = (
        pending_delivery(one_at_a_time, private_broker, keyring, clinic, store_case) for _ in range(3)
    )
    pending_delivery(one_at_a_time, private_broker, keyring, make_key("clinic"), store_case)  # another clinic's
    held = lease(one_at_a_time, keyring, first)
    assert isinstance(held, callback_attempts.Lease)
    with session_scope(one_at_a_time) as session:
        # the attempt under way is not waiting; the oldest that is takes the turn
        assert callback_pacing.next_waiting(session, clinic.clinic_id) == older
    assert record(one_at_a_time, held, 503).outcome == "retry"
    with session_scope(one_at_a_time) as session:  # a retry waits for its backoff, not for a turn
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.case_id == older)
            .values(next_attempt_at=datetime.now(UTC) + timedelta(seconds=60))
        )
        assert callback_pacing.next_waiting(session, clinic.clinic_id) == newer


def test_the_turn_goes_out_as_a_message_once_the_attempt_is_recorded(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    from worker import callbacks as delivery

    first, waiting = (pending_delivery(settings, private_broker, keyring, tenant, store_case) for _ in range(2))
    broker = redis.Redis.from_url(private_broker.url)
    before = _messages(broker, waiting)
    # the fixture's URL (http://x/) is refused where private receivers are not allowed: the attempt
    # ends at once, given up, and its turn is handed on
    production = settings.model_copy(update={"callback_allow_private_urls": False})
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert delivery.deliver(production, keyring, first, publisher=publisher).outcome == "failed"
    assert _messages(broker, waiting) == before + 1
    assert _messages(broker, first) == 1  # its own first message only


def _messages(broker: redis.Redis, case_id: object) -> int:
    return sum(
        str(case_id) in raw.decode() for name in queue_lists(QUEUE_CALLBACKS) for raw in broker.lrange(name, 0, -1)
    )


def test_a_turn_its_callback_cannot_take_is_handed_on(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # Two attempts ending a moment apart both handed their turns to the same waiting callback: the
    # second message found it leased and did nothing, and the clinic's next callback waited for its
    # own message (up to a minute) with a turn free.
    from worker import callbacks as delivery

    handed, after_it = (pending_delivery(settings, private_broker, keyring, tenant, store_case) for _ in range(2))
    broker = redis.Redis.from_url(private_broker.url)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert isinstance(lease(settings, keyring, handed), callback_attempts.Lease)  # the first turn took it
    before = _messages(broker, after_it)
    assert delivery.deliver(settings, keyring, handed, publisher=publisher).outcome == "skipped"
    assert _messages(broker, after_it) == before  # a message of its own finding nothing: nothing more
    assert delivery.deliver(settings, keyring, handed, publisher=publisher, turn=True).outcome == "skipped"
    assert _messages(broker, after_it) == before + 1  # the second turn, handed on


def test_a_turn_that_cannot_be_handed_on_leaves_the_attempts_record(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from worker import callbacks as delivery

    first, waiting = (pending_delivery(settings, private_broker, keyring, tenant, store_case) for _ in range(2))
    broker = redis.Redis.from_url(private_broker.url)
    before = _messages(broker, waiting)

    def timed_out(*_args: object) -> None:
        raise OperationalError("SELECT ...", {}, Exception("canceling statement due to statement timeout"))

    monkeypatch.setattr(callback_pacing, "next_waiting", timed_out)
    production = settings.model_copy(update={"callback_allow_private_urls": False})
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert delivery.deliver(production, keyring, first, publisher=publisher).outcome == "failed"
    assert row(settings, first).status == "failed"  # recorded: its POST is not made again
    assert _messages(broker, waiting) == before  # its own message brings it


def test_a_callbacks_own_message_that_finds_its_row_held_comes_back(
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # An attempt that ends hands its turn to the clinic's oldest waiting callback, its row locked until
    # the record commits. The callback's own message, arriving then, skipped the row and ended; the
    # turn's message, finding the receiver full again, was dropped: nothing brought the callback then
    # but the sweeper, minutes later.
    from worker import callbacks as delivery

    waiting = pending_delivery(settings, private_broker, keyring, tenant, store_case)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    with session_scope(settings) as handing:
        assert callback_pacing.next_waiting(handing, tenant.clinic_id) == waiting  # the turn, being handed
        own = delivery.deliver(settings, keyring, waiting, publisher=publisher)
        assert own.outcome == "held" and own.retry_in == 1.0  # it comes back in a second
        assert row(settings, waiting).attempts == 0
    taken = lease(settings, keyring, waiting)  # the turn's message takes it
    assert isinstance(taken, callback_attempts.Lease)
    # a message finding it leased has nothing to do, and ends
    assert delivery.deliver(settings, keyring, waiting, publisher=publisher).outcome == "skipped"
