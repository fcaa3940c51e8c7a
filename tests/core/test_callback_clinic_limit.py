"""The per-clinic limit on callback attempts under way (``callback_clinic_concurrency``), against the
real database: a clinic whose attempts fill it gets its further callbacks deferred, uncounted, while
other clinics' are leased; the count is taken under a lock on the clinic, so two workers leasing at
once cannot both pass it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text, update

from core import callback_attempts
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery
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

    assert lease(one_at_a_time, keyring, second) == callback_attempts.Busy(1)
    waiting = row(one_at_a_time, second)
    # nothing attempted, nothing counted, nothing held; touched (the sweeper counts from the deferral)
    assert (waiting.status, waiting.attempts, waiting.leased_until) == ("pending", 0, None)
    assert waiting.updated_at > before
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
    assert isinstance(lease(one_at_a_time, keyring, second), callback_attempts.Busy)
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
    assert answers == [callback_attempts.Busy(1)]
    assert row(one_at_a_time, second).attempts == 0


def _waiting_for_a_clinic_lock(settings: Settings) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :cls AND NOT granted"),
                {"cls": callback_attempts.CLINIC_LOCK},
            )
        )
