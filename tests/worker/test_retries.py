"""Transient errors retry with exponential backoff and jitter, up to a limit, putting the case back in
the queue first; everything else fails the case once, fenced by its attempt."""

from __future__ import annotations

import statistics
import traceback
import uuid

import pytest
import redis
from celery.exceptions import Retry
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from core import case_claims
from worker import retries, tasks
from worker.withheld import WithheldError


def connection_lost() -> OperationalError:
    return OperationalError("UPDATE cases ...", {}, Exception("server closed the connection unexpectedly"))


def test_the_backoff_doubles_with_jitter_and_is_capped() -> None:
    for done in range(9):
        base = min(60.0, 2.0**done)
        delays = [retries.retry_delay(done) for _ in range(300)]
        assert all(0.5 * base <= d < 1.5 * base for d in delays)
        assert statistics.pstdev(delays) > 0.1 * base  # jittered: workers hit by one outage do not return in step
    assert statistics.mean(retries.retry_delay(1) for _ in range(500)) > 1.5 * statistics.mean(
        retries.retry_delay(0) for _ in range(500)
    )


@pytest.fixture
def scripted(eager, tenant, store_case, jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A stored case whose classification meets a script of errors, each after a real claim (then the
    real classification); returns the case and a record of the tries and the retries' delays."""
    from core.db import session_scope

    record: dict[str, list] = {"calls": [], "delays": []}
    real_dispatch = tasks.dispatch

    def install(*script: BaseException) -> tuple[uuid.UUID, dict[str, list]]:
        steps = list(script)

        def run(config, case_id, progress):  # type: ignore[no-untyped-def]
            record["calls"].append(case_id)
            if not steps:
                return real_dispatch(config, case_id, progress)
            with session_scope(config) as session:
                claimed = case_claims.claim_case(session, case_id)
            assert claimed is not None
            progress.attempt = claimed.attempts
            raise steps.pop(0)

        def delay(retries: int) -> float:
            record["delays"].append(retries)
            return 0.0

        monkeypatch.setattr(tasks, "dispatch", run)
        monkeypatch.setattr(retries, "retry_delay", delay)
        return store_case(tenant, jpeg_bytes), record

    return install


def transitions(settings, case_id: uuid.UUID, action: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The details of the case's audit events of ``action``, in order."""
    from core.db import session_scope
    from core.models import AuditEvent

    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(AuditEvent.detail)
                .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == action)
                .order_by(AuditEvent.id)
            )
        )


def test_a_lost_database_connection_is_retried_and_the_case_requeued_first(scripted, eager, settings) -> None:  # type: ignore[no-untyped-def]
    case_id, record = scripted(connection_lost(), redis.ConnectionError("Connection refused"))
    assert tasks.classify.apply(args=[str(case_id)]).get() == "succeeded"
    assert len(record["calls"]) == 3 and record["delays"] == [0, 1]
    # each failed attempt was put back in the queue (the retry's own requeue then found nothing to do)
    assert [d["attempt"] for d in transitions(settings, case_id, "case.requeue")] == [1, 2]
    assert (eager(case_id).status, eager(case_id).attempts) == ("succeeded", 3)


def test_transient_errors_give_up_after_the_retry_limit(scripted, eager, settings) -> None:  # type: ignore[no-untyped-def]
    case_id, record = scripted(*[connection_lost() for _ in range(retries.MAX_RETRIES + 1)])
    outcome = tasks.classify.apply(args=[str(case_id)])
    # Celery (and so its events and Flower) is told the error's type, never its text
    assert outcome.failed() and isinstance(outcome.result, WithheldError)
    assert str(outcome.result).startswith("OperationalError")
    assert len(record["calls"]) == retries.MAX_RETRIES + 1
    assert record["delays"][: retries.MAX_RETRIES] == list(range(retries.MAX_RETRIES))  # 1, 2, 4, 8, 16 s (x jitter)
    # The case was left queued: the sweeper publishes it again, so a long outage loses nothing.
    assert eager(case_id).status == "queued" and transitions(settings, case_id, "case.fail") == []
    assert [d["attempt"] for d in transitions(settings, case_id, "case.requeue")] == list(
        range(1, retries.MAX_RETRIES + 2)
    )


@pytest.mark.parametrize("error", [ValueError("bad tensor"), IntegrityError("INSERT", {}, Exception("duplicate"))])
def test_other_errors_fail_the_case_once_without_retry(scripted, eager, settings, error: Exception) -> None:  # type: ignore[no-untyped-def]
    case_id, record = scripted(error)
    assert tasks.classify.apply(args=[str(case_id)]).get() == "failed"
    assert len(record["calls"]) == 1 and record["delays"] == []
    ended = eager(case_id)
    assert (ended.status, ended.failure_code, ended.attempts) == ("failed", "model_error", 1)
    assert transitions(settings, case_id, "case.requeue") == []


@pytest.fixture
def eager(settings, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``classify`` run in this process, one case at a time, its retries without delay; returns a
    function reading a case's row."""
    from core.db import session_scope
    from core.models import Case

    config = settings.model_copy(update={"batching": "off"})
    monkeypatch.setattr(tasks, "settings", lambda: config)
    monkeypatch.setattr(retries, "retry_delay", lambda done: 0.0)

    def case(case_id: uuid.UUID) -> Case:
        with session_scope(settings) as session:
            return session.get(Case, case_id)

    return case


def test_a_worker_out_of_memory_tries_the_case_again_and_never_calls_its_image_damaged(
    eager, tenant, store_case, jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from ml import images

    real, calls = images._load_rgb, []

    def short_of_memory_once(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            raise MemoryError
        return real(*args)

    monkeypatch.setattr(images, "_load_rgb", short_of_memory_once)
    case_id = store_case(tenant, jpeg_bytes)
    assert tasks.classify.apply(args=[str(case_id)]).get() == "succeeded"
    assert (eager(case_id).status, eager(case_id).attempts) == ("succeeded", 2)  # the first try's attempt counts


def test_a_soft_time_limit_while_decoding_fails_the_case_as_out_of_time_not_as_a_damaged_image(
    eager, tenant, store_case, jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from celery.exceptions import SoftTimeLimitExceeded

    from ml import images

    def out_of_time(*args):  # type: ignore[no-untyped-def]
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(images, "_load_rgb", out_of_time)
    case_id = store_case(tenant, jpeg_bytes)
    assert tasks.classify.apply(args=[str(case_id)]).get() == "failed"
    assert (eager(case_id).status, eager(case_id).failure_code) == ("failed", "timeout")


def test_a_case_whose_claim_always_fails_spends_its_attempts_and_then_fails(
    eager, tenant, store_case, settings, jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A claim that meets a database error on every retry (here Postgres's own statement timeout,
    every time this case is claimed) used to leave the case queued with no attempt counted: the sweeper
    published it again and it went round for ever. Each round now costs an attempt, and the last one
    fails the case, as an image that always stops its worker fails."""
    from core.db import session_scope
    from core.models import AuditEvent

    def timed_out_claim(session, case_id, **kwargs):  # type: ignore[no-untyped-def]
        session.execute(text("SET LOCAL statement_timeout = 1"))
        session.execute(text("SELECT pg_sleep(1)"))  # QueryCanceled, an OperationalError: looks transient

    case_id = store_case(tenant, jpeg_bytes)
    monkeypatch.setattr(case_claims, "claim_case", timed_out_claim)
    for spent in range(1, settings.max_attempts):
        outcome = tasks.classify.apply(args=[str(case_id)])  # its retries, then the sweeper's republish
        assert outcome.failed() and isinstance(outcome.result, WithheldError)
        assert (eager(case_id).status, eager(case_id).attempts) == ("queued", spent)
    assert tasks.classify.apply(args=[str(case_id)]).get() == "failed"
    ended = eager(case_id)
    assert (ended.status, ended.failure_code, ended.attempts) == ("failed", "attempts_exhausted", settings.max_attempts)
    assert "database error" in ended.failure_message
    with session_scope(settings) as session:
        starts = session.scalars(
            select(AuditEvent.outcome).where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.start")
        ).all()
    assert starts == ["failure"] * settings.max_attempts  # each spent attempt is on the audit trail


def test_out_of_memory_splits_a_batch_where_other_transient_errors_retry_it() -> None:
    """One case at a time needs less memory than a batch: a MemoryError in a batch runs its cases one
    by one (as any non-transient error does), where a lost connection puts the batch back."""
    from worker.pipeline import _one_by_one_or_raise

    _one_by_one_or_raise(MemoryError(), 4, "batch_classify_failed", "a batch failed to classify")  # split
    with pytest.raises(OperationalError):
        _one_by_one_or_raise(connection_lost(), 4, "batch_classify_failed", "a batch failed to classify")
    with pytest.raises(MemoryError):  # a case alone: retried like any transient error
        _one_by_one_or_raise(MemoryError(), 1, "batch_classify_failed", "a batch failed to classify")


def test_what_celery_keeps_of_a_retried_or_failed_case_never_quotes_the_error(scripted) -> None:  # type: ignore[no-untyped-def]
    # Celery formats the exception a task ends with, and every exception chained to it, into its
    # task-retried and task-failed events, and so into Flower; a database error's text may quote a value.
    marker = "MRN-4417-secret-client-ref"
    quoting = OperationalError("UPDATE cases ...", {}, Exception(f"invalid input syntax: {marker}"))
    case_id, _ = scripted(*[quoting for _ in range(retries.MAX_RETRIES + 1)])
    outcome = tasks.classify.apply(args=[str(case_id)])
    assert outcome.failed() and marker not in (outcome.traceback or "") and "OperationalError" in str(outcome.result)

    tasks.classify.push_request(called_directly=False, is_eager=True, retries=0, id="t", args=[], kwargs={})
    try:
        try:
            raise quoting
        except OperationalError as exc:
            try:
                raise retries.retry(tasks.classify, tasks.settings(), uuid.uuid4(), None, exc) from None
            except Retry as raised:
                told = "".join(traceback.format_exception(raised))
    finally:
        tasks.classify.pop_request()
    assert "WithheldError" in told and marker not in told, told
