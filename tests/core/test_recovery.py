"""The recovery sweeper, state by state, against the real database and a private redis-server (so that
what it publishes reaches no worker and can be inspected): requeue or fail what lost its worker,
republish what lost its message, never duplicate what is still waiting, and one result per case."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from core import callbacks, case_claims, case_states, recovery
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery, Case, ClinicCallback, Result
from core.publisher import make_publisher
from core.queueing import QUEUE_CALLBACKS, QUEUE_MAINTENANCE, queue_lists
from tests import support
from tests.conftest import Tenant, own_database_fixtures
from tests.faults.servers import RedisServer

pytestmark = pytest.mark.usefixtures("database")


# The sweeper looks at every case of its database: these tests get one of their own.
tenant, store_case = own_database_fixtures()


@pytest.fixture
def sweeping(own_database: Settings, private_broker: RedisServer) -> Iterator[tuple[Settings, object, redis.Redis]]:
    config = own_database.model_copy(update={"redis_url": private_broker.url})
    client = redis.Redis.from_url(private_broker.url)
    client.flushdb()
    yield config, make_publisher(config), client
    client.close()


def sweep(sweeping) -> recovery.SweepReport:  # type: ignore[no-untyped-def]
    config, publisher, client = sweeping
    with session_scope(config) as session:
        return recovery.sweep(session, config, publisher, client)


def settle(sweeping) -> None:  # type: ignore[no-untyped-def]
    """Sweep until nothing is published: the module's earlier cases' messages wait from now on."""
    while sweep(sweeping).republished:
        pass


def set_state(settings: Settings, case_id: uuid.UUID, **values: object) -> None:
    with session_scope(settings) as session:
        session.execute(update(Case).where(Case.id == case_id).values(**values))


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def test_a_running_case_that_lost_its_worker_is_requeued_and_published_at_once(
    sweeping, own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    limit = own_database.task_time_limit + own_database.running_grace_seconds
    lost = store_case(tenant, b"lost")
    alive = store_case(tenant, b"alive")
    set_state(own_database, lost, status="running", attempts=1, started_at=ago(limit + 5))
    set_state(own_database, alive, status="running", attempts=1, started_at=ago(limit - 20))
    report = sweep(sweeping)
    assert str(lost) in report.requeued and str(lost) in report.republished
    assert str(alive) not in report.requeued
    case = cases_row(own_database, lost)
    assert (case.status, case.attempts, case.started_at) == ("queued", 1, None)
    assert cases_row(own_database, alive).status == "running"
    assert str(lost) in recovery.broker_case_ids(sweeping[2])


def test_nothing_is_published_before_the_sweep_commits(
    sweeping, own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    config, publisher, client = sweeping
    lost = store_case(tenant, b"lost")
    set_state(own_database, lost, status="running", attempts=1, started_at=ago(own_database.task_time_limit + 3600))
    with session_scope(config) as session:
        report = recovery.sweep(session, config, publisher, client)
        assert report.requeued == [str(lost)]
        assert str(lost) not in recovery.broker_case_ids(client)  # the transaction still holds the row
        assert report.republished == []
    assert str(lost) in recovery.broker_case_ids(client) and report.republished == [str(lost)]
    published = cases_row(own_database, lost).published_at  # stamped by the sweep's own transaction
    assert published is not None and published >= cases_row(own_database, lost).updated_at


class Watching:
    """A publisher that, as each message leaves, does what the worker receiving it does first: lock
    its row, skipping it if locked (a batch's claim, a callback's lease), and read it."""

    def __init__(self, publisher: object, settings: Settings) -> None:
        self.publisher, self.settings, self.seen = publisher, settings, []  # type: ignore[var-annotated]

    def send_task(self, name: str, args: list[str], **options: object) -> object:
        sent = self.publisher.send_task(name, args=args, **options)  # type: ignore[attr-defined]
        case_id = uuid.UUID(args[0])
        stamp = (
            select(CallbackDelivery.updated_at).where(CallbackDelivery.case_id == case_id)
            if "callback" in name
            else select(Case.published_at).where(Case.id == case_id)
        )
        with session_scope(self.settings) as session:
            self.seen.append(session.scalar(stamp.with_for_update(skip_locked=True)))
        return sent


def test_a_republished_case_or_callback_is_stamped_before_its_message_leaves(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    """Stamped after the sends, in a transaction of their own, the rows were locked just as their
    messages arrived: a worker's claim (or a callback's lease) skipped the locked row, its message was
    dropped, and the case waited for another sweep and its grace period."""
    config, publisher, client = sweeping
    callback_case = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    client.delete(*queue_lists(QUEUE_CALLBACKS))  # its callback's message lost
    lost = store_case(tenant, b"lost")
    set_state(own_database, lost, status="running", attempts=1, started_at=ago(own_database.task_time_limit + 3600))
    stale = datetime.now(UTC) - timedelta(seconds=own_database.requeue_grace_seconds + 1)
    with session_scope(own_database) as session:
        session.execute(
            update(CallbackDelivery).where(CallbackDelivery.case_id == callback_case).values(updated_at=stale)
        )
    watching = Watching(publisher, config)
    swept_at = datetime.now(UTC)
    with session_scope(config) as session:
        report = recovery.sweep(session, config, watching, client)  # type: ignore[arg-type]
    assert report.republished == [str(lost)] and report.callbacks_republished == [str(callback_case)]
    assert len(watching.seen) == 2 and all(
        at is not None and at >= swept_at - timedelta(seconds=5) for at in watching.seen
    )
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def test_a_case_out_of_attempts_fails_with_timeout_and_a_clear_message(
    sweeping, own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"poison")
    limit = own_database.task_time_limit + own_database.running_grace_seconds
    set_state(own_database, case_id, status="running", attempts=own_database.max_attempts, started_at=ago(limit + 1))
    report = sweep(sweeping)
    assert str(case_id) in report.failed and str(case_id) not in report.republished
    case = cases_row(own_database, case_id)
    assert (case.status, case.failure_code) == ("failed", "timeout")
    assert f"none of {own_database.max_attempts} attempts finished" in case.failure_message
    assert str(case_id) not in recovery.broker_case_ids(sweeping[2])


def test_only_queued_cases_whose_message_is_lost_are_published_again(
    sweeping, own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    grace = own_database.requeue_grace_seconds
    lost, waiting, fresh = (store_case(tenant, data) for data in (b"lost", b"waiting", b"fresh"))
    for case_id in (lost, waiting):
        set_state(own_database, case_id, updated_at=ago(grace + 5))
    _, publisher, client = sweeping
    assert support.publish_classify(publisher, waiting, "routine")  # its message is still in the queue
    report = sweep(sweeping)
    assert report.broker_checked
    assert str(lost) in report.republished
    assert str(waiting) not in report.republished and str(fresh) not in report.republished
    # Once published, a case is not published again while its message waits.
    assert str(lost) not in sweep(sweeping).republished
    ids = [m for m in (recovery._case_id_of(raw) for raw in client.lrange("cases\x06\x166", 0, -1)) if m]
    assert sorted(ids.count(str(c)) for c in (lost, waiting)) == [1, 1]


def test_a_lost_case_behind_a_sweeps_worth_of_waiting_ones_is_found_urgent_first(
    sweeping, own_database: Settings, tenant: Tenant, store_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The sweeper looked at the ``BATCH`` oldest stale cases only: under a backlog older than the
    grace period whose messages wait, a case that lost its message behind them, an urgent one
    included, was never published again. It now reads on, in the order workers serve the queue."""
    monkeypatch.setattr(recovery, "BATCH", 2)
    _, publisher, _ = sweeping
    settle(sweeping)
    grace = own_database.requeue_grace_seconds
    backlog = [store_case(tenant, b"waiting") for _ in range(3)]
    lost = store_case(tenant, b"lost")
    urgent = store_case(tenant, b"urgent", "urgent")
    for case_id in (*backlog, lost, urgent):
        set_state(own_database, case_id, updated_at=ago(grace + 5))
    for case_id in backlog:
        assert support.publish_classify(publisher, case_id, "routine")
    report = sweep(sweeping)
    assert report.republished == [str(urgent), str(lost)]  # two lost, urgent first: a batch's worth


def test_a_stale_case_whose_message_waits_stays_claimable_while_the_sweep_runs(
    sweeping, own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # A backlog older than the grace period: the sweep must not hold the head of the queue locked,
    # or the worker that receives its message finds it locked, skips it and drops the message.
    config, publisher, client = sweeping
    grace = own_database.requeue_grace_seconds
    lost, waiting = store_case(tenant, b"lost"), store_case(tenant, b"waiting")
    for case_id in (lost, waiting):
        set_state(own_database, case_id, updated_at=ago(grace + 5))
    assert support.publish_classify(publisher, waiting, "routine")
    with session_scope(config) as session:
        report = recovery.sweep(session, config, publisher, client)
        with session_scope(own_database) as worker:  # a worker's claim while the sweep's transaction is open
            claimed = case_claims.claim_batch(worker, waiting, limit=1)
            assert [case.id for case in claimed] == [waiting]
    assert str(lost) in report.republished and str(waiting) not in report.republished
    assert cases_row(own_database, waiting).status == "running"


def test_a_stale_worker_cannot_store_a_second_result(
    own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"twice")
    with session_scope(own_database) as session:
        assert case_claims.claim_case(session, case_id).attempts == 1
    with session_scope(own_database) as session:  # the sweeper takes the case back; attempt 2 claims it
        assert case_states.requeue_case(session, case_id, attempt=1, reason="worker_lost")
        assert case_claims.claim_case(session, case_id).attempts == 2
    result = {
        "label": "nv",
        "probabilities": {"nv": 1.0},
        "confidence": 1.0,
        "uncertainty": 0.0,
        "referral": False,
        "referral_reasons": [],
        "gradcam_status": "timeout",
        "gradcam_class": None,
        "model_id": "m",
        "weights_sha256": "0" * 64,
        "device": "cpu",
        "timings": {},
    }
    with session_scope(own_database) as session:  # attempt 1 comes back from the dead: fenced out
        stale = case_states.Completion(case_id, 1, result, None)
        assert case_states.complete_cases(session, keyring=keyring, completions=[stale]) == set()
    with session_scope(own_database) as session:
        current = case_states.Completion(case_id, 2, result, None)
        assert case_states.complete_cases(session, keyring=keyring, completions=[current]) == {case_id}
    with pytest.raises(IntegrityError), session_scope(own_database) as session:  # and the database says so too
        session.add(Result(case_id=case_id, **result))
        session.flush()
    with session_scope(own_database) as session:
        assert session.scalar(select(func.count()).select_from(Result).where(Result.case_id == case_id)) == 1


def test_a_case_claimed_on_a_host_whose_clock_runs_behind_is_not_taken_for_overdue(
    sweeping, own_database: Settings, tenant: Tenant, store_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The worker host's clock ten minutes behind the sweeper's: its claims were stamped with it, so
    each case it took looked overdue at once and was put back in the queue while it ran (its result
    then thrown away, and after three attempts the case failed ``timeout``). A claim is stamped by the
    database's clock, which the sweeper reads too."""
    behind = datetime.now(UTC) - timedelta(minutes=10)
    monkeypatch.setattr("core.cases.now", lambda: behind)  # the worker host's clock
    single, batched = store_case(tenant, b"claimed alone"), store_case(tenant, b"claimed in a batch")
    with session_scope(own_database) as session:
        assert case_claims.claim_case(session, single) is not None
        assert case_claims.claim_batch(session, batched, limit=1)
        database_now = session.execute(select(func.now())).scalar_one()
    for case_id in (single, batched):
        assert cases_row(own_database, case_id).started_at == database_now
    report = sweep(sweeping)
    assert str(single) not in report.requeued and str(batched) not in report.requeued
    assert [cases_row(own_database, c).status for c in (single, batched)] == ["running", "running"]


def test_a_redelivered_message_for_a_running_case_is_skipped(
    own_database: Settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_classification

    case_id = store_case(tenant, b"running elsewhere")
    set_state(own_database, case_id, status="running", attempts=1, started_at=ago(1))
    assert run_classification(own_database, case_id) == "skipped"
    case = cases_row(own_database, case_id)
    assert (case.status, case.attempts) == ("running", 1)


def test_a_pending_callback_whose_message_was_lost_is_published_again(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    _, publisher, client = sweeping
    case_id = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    with session_scope(own_database) as session:
        assert not callbacks.note_finished(session, case_id, publisher=publisher)  # one notice per case
    assert callback_messages(client, case_id) == 1  # its own message, sent once the failure committed
    client.delete(*queue_lists(QUEUE_CALLBACKS))  # ...and lost
    report = sweep(sweeping)
    assert str(case_id) not in report.callbacks_republished  # fresh: its own message may still come
    stale = datetime.now(UTC) - timedelta(seconds=own_database.requeue_grace_seconds + 1)
    with session_scope(own_database) as session:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id == case_id).values(updated_at=stale))
    report = sweep(sweeping)
    assert str(case_id) in report.callbacks_republished
    assert callback_messages(client, case_id) == 1
    with session_scope(own_database) as session:  # touched once sent: not stale again at once
        assert session.get(CallbackDelivery, case_id).updated_at > stale
    assert str(case_id) not in sweep(sweeping).callbacks_republished
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def test_a_callback_whose_message_still_waits_is_not_sent_again(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    """Behind a backlog of cases a callback's message waits longer than the staleness bound: each sweep
    added a copy, and once the backlog drained the copies' attempts came one after another, without
    the backoff (a receiver down for those seconds spent every attempt)."""
    _, publisher, client = sweeping
    case_id = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    stale = datetime.now(UTC) - timedelta(seconds=own_database.requeue_grace_seconds + 1)
    with session_scope(own_database) as session:  # its message still waits behind a backlog
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id == case_id).values(updated_at=stale))
    assert str(case_id) not in sweep(sweeping).callbacks_republished
    assert callback_messages(client, case_id) == 1
    # a message an earlier release sent to the maintenance queue, where a classification worker still
    # delivers it during an upgrade, is waiting too
    for source, target in zip(queue_lists(QUEUE_CALLBACKS), queue_lists(QUEUE_MAINTENANCE), strict=True):
        while client.rpoplpush(source, target) is not None:
            pass
    assert callback_messages(client, case_id) == 0
    assert str(case_id) not in sweep(sweeping).callbacks_republished
    client.delete(*queue_lists(QUEUE_MAINTENANCE))  # now lost: sent again, to the callbacks queue
    assert str(case_id) in sweep(sweeping).callbacks_republished
    assert callback_messages(client, case_id) == 1
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def test_one_sweep_task_republishes_every_lost_case_not_one_batch(
    sweeping, own_database: Settings, tenant: Tenant, store_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """After Redis lost its data one batch a sweep (500, every 30 s) was republished: fewer than the
    workers classify, and tens of thousands of cases waited half an hour. The task goes on, a batch a
    transaction, until one is not full."""
    from worker.tasks import sweep_once

    monkeypatch.setattr(recovery, "BATCH", 2)
    config, publisher, client = sweeping
    settle(sweeping)
    grace = own_database.requeue_grace_seconds
    lost = [store_case(tenant, b"lost") for _ in range(5)]
    for case_id in lost:
        set_state(own_database, case_id, updated_at=ago(grace + 5))
    done = sweep_once(config, publisher, client)
    assert done["republished"] == 5
    assert {str(c) for c in lost} <= recovery.broker_case_ids(client)


def finished_with_callback(settings: Settings, keyring, tenant: Tenant, store_case, publisher) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A case of a clinic with a callback, failed: its delivery is pending and its message sent."""
    from core.keys import Principal
    from core.models import Role

    case_id = store_case(tenant, b"finished")
    with session_scope(settings) as session:
        callbacks.register(
            session,
            keyring=keyring,
            settings=settings,
            principal=Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id),
            actor=_actor(),
            url="http://127.0.0.1:9/x",
        )
        assert case_states.fail_case(session, case_id=case_id, attempt=None, code="invalid_image", message="broken")
        assert callbacks.note_finished(session, case_id, publisher=publisher)
    return case_id


def callback_messages(client: redis.Redis, case_id: uuid.UUID) -> int:
    """How many callback messages for ``case_id`` wait in the callbacks queue (any of its lists)."""
    messages = [raw for name in queue_lists(QUEUE_CALLBACKS) for raw in client.lrange(name, 0, -1)]
    return sum(1 for raw in messages if str(case_id).encode() in raw and b"dermq.callback" in raw)


def _actor():  # type: ignore[no-untyped-def]
    from core import audit

    return audit.SYSTEM


def cases_row(settings: Settings, case_id: uuid.UUID) -> Case:
    with session_scope(settings) as session:
        return session.get(Case, case_id)
