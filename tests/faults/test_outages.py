"""Outages of Redis and Postgres with real processes: what clinics get while they last, and that every
accepted case completes afterwards, exactly once."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from core import idempotency
from core.crypto import load_keyring
from core.db import dispose_engines, session_scope
from core.models import AuditEvent, Case
from tests import support
from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.slow


def timed_submit(stack: FaultStack, image: bytes, **headers: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{stack.base_url}/v1/cases",
        headers={**stack.headers, **headers},
        files={"image": ("lesion.jpg", image, "image/jpeg")},
        timeout=30,
    )
    return response, time.perf_counter() - started


def test_a_redis_outage_still_accepts_cases_fast_and_completes_them_afterwards(stack: FaultStack) -> None:
    stack.start_worker("redis")
    stack.wait_terminal(stack.accepted())  # warm: model loaded, connections open
    baseline = [timed_submit(stack, stack.images[i])[1] for i in range(3)]

    stack.broker.stop()
    accepted, during = [], []
    for i in range(3):
        response, seconds = timed_submit(stack, stack.images[i])
        assert response.status_code == 202, response.text
        accepted.append(uuid.UUID(response.json()["id"]))
        during.append(seconds)
    print(f"intake, Redis up: {[round(s * 1000) for s in baseline]} ms; down: {[round(s * 1000) for s in during]} ms")
    # The publish fails fast (a refused connection, one retry 50 ms later), not after seconds.
    assert max(during) < max(baseline) + 0.5
    for case_id in accepted:  # durable in Postgres while the broker is gone
        assert stack.case(case_id).status == "queued"
    ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.headers["retry-after"]
    checks = ready.json()["checks"]
    assert checks["postgres"] == "ok" and checks["redis"].startswith("unreachable")

    stack.broker.start()  # empty: every message published before the outage is gone too
    for case_id in accepted:
        case = stack.wait_terminal(case_id, timeout=120)
        assert (case.status, case.attempts) == ("succeeded", 1)
        assert stack.counts(case_id)["results"] == 1
    assert httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200
    # only the sweeper can have published them again (the restarted broker is empty); one message may
    # be enough for all three, since a worker's batch claims every queued case it finds
    assert stack.sweeper.totals["republished"] >= 1
    assert stack.clinic_totals()["half_written"] == 0


def test_a_postgres_outage_answers_503_and_loses_nothing(stack: FaultStack) -> None:
    worker = stack.start_worker("postgres", {"sleep": 2})
    before = [stack.accepted(image) for image in stack.images[:3]]
    pending = set(before)
    # Wait until one of these cases is being classified (claimed, then held 2 s in inference by the
    # fault), so that the outage hits a running job of this test's: a case an earlier test of the module
    # left queued may be the first one the worker takes.
    support.wait_for(
        lambda: any(stack.case(case_id).status == "running" for case_id in before),
        timeout=60,
        interval=0.05,
        what="one of the cases to be under way",
    )
    stack.pg.stop()
    try:
        response, _ = timed_submit(stack, stack.images[3], **{"Idempotency-Key": "during-the-outage"})
        assert response.status_code == 503, response.text
        problem = response.json()
        assert problem["code"] == "database_unavailable" and int(response.headers["retry-after"]) > 0
        assert response.headers["content-type"] == "application/problem+json"
        poll = httpx.get(f"{stack.base_url}/v1/cases/{before[0]}", headers=stack.headers, timeout=10)
        assert poll.status_code == 503
        ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgres"].startswith("unreachable") and ready.json()["checks"]["redis"] == "ok"

        def retrying() -> bool:
            """Whether the running job's commit has failed meanwhile (a transient error): the task of one
            of these cases is retried with backoff, holding its attempt (waiting out its countdown, or
            trying again)."""
            tasks = worker.active() + [entry["request"] for entry in worker.scheduled()]
            return any(
                "requeue_attempt" in task["kwargs"] and any(str(case_id) in str(task["args"]) for case_id in before)
                for task in tasks
            )

        support.wait_for(retrying, timeout=60, interval=0.05, what="the running job's commit to fail and be retried")
    finally:
        stack.pg.start()

    for case_id in before:
        case = stack.wait_terminal(case_id, timeout=120)
        assert case.status == "succeeded", (case.failure_code, case.failure_message)
        assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
        pending.discard(case_id)
    assert not pending
    # The running job's store failed on the lost connection, and its case went back to the queue: put
    # there by the task's retry once the database answered (transient_error) or, when the outage and
    # the retries' backoff outlasted the task's time limit (18 s here; a slow Postgres restart under
    # load), by the sweeper first (worker_lost). tests/worker/test_retries.py proves the retry's path
    # on its own, without the race.
    with session_scope(stack.settings) as session:
        retried = session.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.action == "case.requeue", AuditEvent.entity_id.in_([str(c) for c in before])
            )
        ).all()
    assert {detail["reason"] for detail in retried} & {"transient_error", "worker_lost"}, retried

    # The refused submission left nothing behind: its key is unused, so the same request now creates.
    with session_scope(stack.settings) as session:
        stored = session.scalar(
            select(func.count())
            .select_from(Case)
            .where(
                Case.idempotency_key
                == idempotency.digest(load_keyring(stack.settings), stack.clinic_id, "during-the-outage")
            )
        )
    assert stored == 0
    response, _ = timed_submit(stack, stack.images[3], **{"Idempotency-Key": "during-the-outage"})
    assert response.status_code == 202 and "idempotent-replayed" not in response.headers
    assert stack.wait_terminal(uuid.UUID(response.json()["id"])).status == "succeeded"
    # every case of the clinic ends (one retried by the sweeper may still be under way) and none is half written
    totals = support.wait_for(
        lambda: (t := stack.clinic_totals()) and not t.get("running") and not t.get("queued") and t,
        timeout=120,
        what="every case of the clinic to end",
    )
    assert totals["half_written"] == 0, totals


def test_a_case_answered_with_its_result_survives_a_postgres_crash(stack: FaultStack) -> None:
    """The worker's claim and store, and the case a waiting submission creates, commit without waiting
    for the disk (core.db.commit_without_flush); the answer follows the durable commit of its audited
    read, which flushes them too. So a crash right after the answer (an immediate stop: Postgres's
    memory, unwritten WAL included, is lost) loses nothing the clinic was told."""
    stack.pg.stop()
    stack.pg.start("-c synchronous_commit=on")  # the fault stack's server otherwise never waits for the WAL
    try:
        stack.start_worker("crash")
        stack.wait_terminal(stack.accepted())  # warm: model loaded, connections open
        response = httpx.post(
            f"{stack.base_url}/v1/cases?wait=30",
            headers=stack.headers,
            files={"image": ("lesion.jpg", stack.images[0], "image/jpeg")},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        stack.pg.stop("immediate")  # a crash: no shutdown checkpoint
    finally:
        stack.pg.stop()
        stack.pg.start()
        dispose_engines()  # this process's pooled connections died with the server
    answered = response.json()
    case_id = uuid.UUID(answered["id"])
    case = stack.wait_status(case_id, "succeeded", timeout=5)  # there at once, not classified again
    assert case.attempts == 1 and stack.counts(case_id)["results"] == 1
    with session_scope(stack.settings) as session:
        actions = set(session.scalars(select(AuditEvent.action).where(AuditEvent.entity_id == str(case_id))).all())
    assert {"case.create", "case.start", "case.classify", "case.read"} <= actions, actions


def test_a_case_answered_as_stored_after_a_busy_wait_survives_a_postgres_crash(stack: FaultStack) -> None:
    """A waiting submission whose read finds the database busy (its audit event waits for a lock past
    the lock timeout) is answered 202 with the case as stored. The case's commit did not wait for the
    disk, and no audited read followed it: the 202 came on that commit alone, and a crash right after
    the answer lost the accepted case. The WAL writer is slowed to 10 s, so that only a commit made
    for the answer can have written the case's out before the crash."""
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, text

    from api.app import create_app

    stack.pg.stop()
    stack.pg.start("-c synchronous_commit=on", "-c wal_writer_delay=10000")
    settings = stack.settings.model_copy(update={"database_lock_timeout_ms": 300})
    watcher = create_engine(stack.settings.database_url)
    answers: list[httpx.Response] = []
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            image = {"image": ("lesion.jpg", stack.images[1], "image/jpeg")}
            post = threading.Thread(
                target=lambda: answers.append(api.post("/v1/cases?wait=3", headers=stack.headers, files=image))
            )
            with watcher.connect() as look:
                before = look.scalar(text("SELECT count(*) FROM cases"))
                post.start()
                support.wait_for(
                    lambda: look.scalar(text("SELECT count(*) FROM cases")) > before,
                    timeout=30,
                    what="the case to be committed",
                )
                look.rollback()
                look.execute(text("LOCK TABLE audit_events IN SHARE MODE"))  # the read's audit event waits
                post.join(30)
                look.rollback()
        stack.pg.stop("immediate")  # a crash: no shutdown checkpoint
    finally:
        watcher.dispose()
        stack.pg.stop()
        stack.pg.start()
        dispose_engines()  # this process's pooled connections died with the server
    (answer,) = answers
    assert answer.status_code == 202, answer.text
    assert stack.case(uuid.UUID(answer.json()["id"])) is not None  # accepted, so kept


def test_a_broker_restart_during_a_case_lets_the_case_finish_on_its_first_attempt(stack: FaultStack) -> None:
    # Postgres holds the case, its claim and its result; Redis only carried the message. A broker that
    # goes away while the case runs must not cost the case its attempt, nor the clinic the minutes
    # until the sweeper takes over from a killed child.
    worker = stack.start_worker("blip", {"sleep": 4, "times": 1})
    case_id = stack.accepted()
    stack.wait_injected(worker)  # in inference now, for 4 s
    stack.broker.stop()
    stack.broker.start()
    case = stack.wait_terminal(case_id, timeout=60)
    assert (case.status, case.attempts) == ("succeeded", 1), (case.status, case.failure_code, case.failure_message)
    assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert worker.alive()


def test_a_batch_whose_store_meets_a_postgres_outage_ends_every_case_once(stack: FaultStack) -> None:
    """A batch of four is in inference when Postgres stops, and its store meets the outage: the lead's
    task retries once the database answers; the other cases, which the batch could not put back,
    stay running until the sweeper requeues them (the hard limit and grace). Each ends once."""
    batch = [stack.accepted(image) for image in stack.images[:4]]  # queued before a worker is up: one batch
    worker = stack.start_worker("pg-batch", {"sleep": 4, "times": 1})
    stack.wait_injected(worker)
    assert {stack.case(case_id).status for case_id in batch} == {"running"}
    stack.pg.stop()
    try:
        time.sleep(5)  # the inference ends meanwhile: the store finds no database
    finally:
        stack.pg.start()
        dispose_engines()  # this process's pooled connections died with the server
    restarted = time.monotonic()
    bound = stack.settings.task_time_limit + stack.settings.running_grace_seconds + 15
    for case_id in batch:
        case = stack.wait_terminal(case_id, timeout=max(1.0, bound - (time.monotonic() - restarted)))
        assert (case.status, case.attempts) == ("succeeded", 2), (case.status, case.failure_code)
        assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert worker.alive() and worker.ping()
