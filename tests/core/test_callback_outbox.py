"""The callback outbox's attempts against the real database: an attempt leases its row (a duplicate
finds it leased), its outcome is fenced by the attempt number (a late worker whose lease ran out
changes nothing), and attempts end in delivered or failed."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from core import audit, callback_attempts, callbacks, case_states, retention
from core.callback_pacing import NotDue
from core.config import Settings
from core.db import session_scope
from core.errors import KeyNotHeld
from core.keys import Principal
from core.models import AuditEvent, CallbackDelivery, Case, Role
from core.publisher import make_publisher
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def pending(settings: Settings, private_broker, keyring, tenant: Tenant, store_case) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A failed case of a clinic with a callback: its delivery is pending (its message goes to a
    private broker that no worker reads)."""
    return pending_delivery(settings, private_broker, keyring, tenant, store_case)


def pending_delivery(  # type: ignore[no-untyped-def]
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case, url: str = "http://x/"
) -> uuid.UUID:
    """:func:`pending`, its callback's secret sealed under ``keyring``, its URL ``url``."""
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    case_id = store_case(tenant, b"finished")
    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    with session_scope(settings) as session:
        callbacks.register(
            session, keyring=keyring, settings=settings, principal=principal, actor=audit.SYSTEM, url=url
        )
        assert case_states.fail_case(session, case_id=case_id, attempt=None, code="invalid_image", message="no")
        assert callbacks.note_finished(session, case_id, publisher=publisher)
    return case_id


def lease(settings: Settings, keyring, case_id: uuid.UUID, after: int | None = None) -> object:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return callback_attempts.lease(session, settings=settings, keyring=keyring, case_id=case_id, after=after)


def record(settings: Settings, held: callback_attempts.Lease, status: int | None) -> callback_attempts.Delivery:
    with session_scope(settings) as session:
        return callback_attempts.record_attempt(session, settings=settings, lease=held, http_status=status, error=None)


def due(settings: Settings, case_id: uuid.UUID) -> None:
    """The retry's backoff has passed (as if its message came when it was due)."""
    with session_scope(settings) as session:
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.case_id == case_id)
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def row(settings: Settings, case_id: uuid.UUID) -> CallbackDelivery:
    with session_scope(settings) as session:
        found = session.get(CallbackDelivery, case_id)
        assert found is not None
        return found


def test_an_attempt_leases_its_row_and_a_late_one_is_fenced_out(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    first = lease(settings, keyring, pending)
    assert first is not None and first.attempt == 1 and first.secrets and b'"status":"failed"' in first.body
    assert "whsec" not in repr(first)
    assert lease(settings, keyring, pending) is None  # a duplicated message while the POST runs
    assert record(settings, first, 500) == callback_attempts.Delivery("retry", 1, 500)
    assert (row(settings, pending).leased_until, row(settings, pending).status) == (None, "pending")

    due(settings, pending)
    second = lease(settings, keyring, pending)
    assert second is not None and second.attempt == 2
    with session_scope(settings) as session:  # its worker died: the lease runs out
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.case_id == pending)
            .values(leased_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    third = lease(settings, keyring, pending)
    assert third is not None and third.attempt == 3
    assert record(settings, second, 204).outcome == "skipped"  # too late: the row is the third's
    assert (row(settings, pending).status, row(settings, pending).attempts) == ("pending", 3)
    assert record(settings, third, 204) == callback_attempts.Delivery("delivered", 3, 204)
    done = row(settings, pending)
    assert (done.status, done.last_http_status, done.leased_until) == ("delivered", 204, None)
    assert lease(settings, keyring, pending) is None


def test_attempts_end_in_failed(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    config = settings.model_copy(update={"callback_max_attempts": 2})
    held = lease(config, keyring, pending)
    assert held is not None and record(config, held, None).outcome == "retry"
    due(config, pending)
    held = lease(config, keyring, pending)
    assert held is not None and record(config, held, 503) == callback_attempts.Delivery("failed", 2, 503)
    assert row(settings, pending).status == "failed" and lease(config, keyring, pending) is None


def test_an_unreadable_secret_gives_up_at_once(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    held = lease(settings, keyring, pending)
    assert held is not None
    unreadable = dataclasses.replace(held, secrets=())
    assert record(settings, unreadable, None).outcome == "failed"


def test_attempts_whose_answers_were_never_recorded_end_in_failed(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    """A worker that dies, or runs out of time, mid-POST records nothing; its lease runs out and the
    sweeper sends the row again. Each such attempt is audited when its lease is taken over (its POST may
    have reached the clinic: the trail must not miss it), and once every attempt is spent the row is
    given up rather than sent again forever (each try held a worker child for its time limit)."""
    config = settings.model_copy(update={"callback_max_attempts": 2})
    for attempt in (1, 2):
        held = lease(config, keyring, pending)
        assert held is not None and held.attempt == attempt
        with session_scope(settings) as session:  # no answer recorded: the lease runs out
            session.execute(
                update(CallbackDelivery)
                .where(CallbackDelivery.case_id == pending)
                .values(leased_until=datetime.now(UTC) - timedelta(seconds=1))
            )
    assert lease(config, keyring, pending) is None
    given_up = row(settings, pending)
    assert (given_up.status, given_up.attempts, given_up.leased_until) == ("failed", 2, None)
    assert given_up.last_error == "unanswered"
    with session_scope(settings) as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_id == str(pending), AuditEvent.action == "callback.deliver")
            .order_by(AuditEvent.id)
        ).all()
    assert [(e.outcome, e.detail) for e in events] == [
        (audit.FAILURE, {"attempt": attempt, "error": "unanswered"}) for attempt in (1, 2)
    ]


def test_an_erased_case_is_not_announced_as_finished(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        case = session.get(Case, pending)
        assert case is not None
        retention.purge_case(session, case, actor=audit.SYSTEM, reason="test")
    assert lease(settings, keyring, pending) == callback_attempts.Cancelled("case_erased", 0)
    assert row(settings, pending).status == "cancelled"
    with session_scope(settings) as session:  # why no news was sent, for an auditor
        (event,) = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == str(pending), AuditEvent.action == "callback.deliver")
        )
        assert (event.outcome, event.detail) == (audit.FAILURE, {"error": "cancelled", "reason": "case_erased"})


def test_a_url_todays_settings_refuse_is_given_up_without_a_call(
    settings: Settings, keyring, pending, private_broker
) -> None:  # type: ignore[no-untyped-def]
    """A URL registered while private receivers were allowed (``http://x/``) is not called once they are
    not: the delivery is given up at its first attempt, and the audit event says why."""
    from worker import callbacks as delivery

    assert settings.callback_allow_private_urls  # what let the fixture register it
    production = settings.model_copy(update={"callback_allow_private_urls": False})
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    assert delivery.deliver(production, keyring, pending, publisher=publisher) == callback_attempts.Delivery(
        "failed", 1
    )
    refused = row(settings, pending)
    assert (refused.status, refused.last_error) == ("failed", delivery.URL_REFUSED)  # what the clinic is shown
    with session_scope(settings) as session:
        details = session.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.entity_id == str(pending), AuditEvent.action == "callback.deliver"
            )
        ).all()
    assert [d.get("error") for d in details] == [delivery.URL_REFUSED]


def test_a_host_whose_clock_runs_ahead_leaves_a_live_lease_alone(  # type: ignore[no-untyped-def]
    settings: Settings, keyring, pending, monkeypatch: pytest.MonkeyPatch
) -> None:
    # leases were stamped and compared with each host's own clock: a worker or sweeper whose clock ran
    # ahead of the one that leased the row took it over while its POST ran, and sent the news twice
    held = lease(settings, keyring, pending)
    assert held is not None
    fast = lambda: datetime.now(UTC) + timedelta(hours=1)  # noqa: E731
    monkeypatch.setattr(callback_attempts, "now", fast)
    monkeypatch.setattr(callbacks, "now", fast)
    assert lease(settings, keyring, pending) is None
    with session_scope(settings) as session:
        assert callbacks.stale_deliveries(session, fast(), [pending]) == []
        assert pending not in [case_id for _, case_id in callbacks.stale_page(session, fast(), 500)]
    assert record(settings, held, 204).outcome == "delivered"


def test_a_secret_sealed_under_a_key_not_yet_on_this_worker_waits_for_it(  # type: ignore[no-untyped-def]
    settings: Settings, private_broker, keyring, tenant: Tenant, store_case
) -> None:
    """A key rotation rolling out: the API process that registered the callback already had the new
    key file, the worker leasing its delivery not yet. That used to read as a secret that can never
    be opened, and the delivery was given up at its first attempt ("register again"). The lease now
    fails as a key not held (retried: the worker reads its key file again once it changes), spending
    no attempt, and succeeds once the worker has the key."""
    rotated = keyring.with_new_active_key()
    case_id = pending_delivery(settings, private_broker, rotated, tenant, store_case)
    with pytest.raises(KeyNotHeld):
        lease(settings, keyring, case_id)
    waiting = row(settings, case_id)
    assert (waiting.status, waiting.attempts, waiting.leased_until) == ("pending", 0, None)
    held = lease(settings, rotated, case_id)
    assert held is not None and held.attempt == 1 and held.secrets


def test_a_retry_is_not_attempted_before_its_backoff_has_passed(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    # Redis hands a message out again when it stays unacknowledged past the visibility timeout, as a
    # due retry waiting for a busy callback worker's thread can: that copy found the row free and
    # made an attempt at once, spending it without the backoff.
    config = settings.model_copy(update={"callback_backoff_seconds": 60.0})
    held = lease(config, keyring, pending)
    assert held is not None
    answer = record(config, held, 503)
    assert answer.outcome == "retry" and answer.retry_in is not None and 30 <= answer.retry_in < 90  # jittered
    assert row(config, pending).next_attempt_at is not None
    assert lease(config, keyring, pending) is None  # the first message again: the retry is not its own
    assert lease(config, keyring, pending, after=0) is None
    early = lease(config, keyring, pending, after=1)  # the retry's message, early by its host's clock
    assert isinstance(early, NotDue) and 20 < early.seconds < 90  # it waits out the rest
    assert row(config, pending).attempts == 1
    due(config, pending)
    assert lease(config, keyring, pending, after=0) is None  # a copy of a message whose attempt was made
    taken = lease(config, keyring, pending, after=1)
    assert isinstance(taken, callback_attempts.Lease) and taken.attempt == 2
    assert lease(config, keyring, pending, after=1) is None  # a copy of the retry's message, once it is made


def test_a_copy_with_nothing_to_do_does_not_hold_the_row_from_the_retry(settings: Settings, keyring, pending) -> None:  # type: ignore[no-untyped-def]
    # A copy of a message whose attempt was made locked the row while it found that out, and the due
    # retry's own message, skipping the locked row, was dropped: the delivery then waited for the sweeper.
    held = lease(settings, keyring, pending)
    assert held is not None and record(settings, held, 503).outcome == "retry"
    due(settings, pending)
    with session_scope(settings) as session:  # the copy, its transaction still open
        assert callback_attempts.lease(session, settings=settings, keyring=keyring, case_id=pending, after=0) is None
        taken = lease(settings, keyring, pending, after=1)  # the retry's own message, meanwhile
        assert isinstance(taken, callback_attempts.Lease) and taken.attempt == 2
