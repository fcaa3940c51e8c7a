"""Long polls: `?wait=` answers as soon as a case has ended (woken by the commit that ends it), or
after the wait; one request per case is enough."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, func, select, text

from api.app import create_app
from core import case_states
from core.db import session_scope
from core.models import AuditEvent
from tests import support
from tests.conftest import Tenant


def end_case(settings, case_id: uuid.UUID) -> None:  # type: ignore[no-untyped-def]
    """End a queued case from another connection, as the sweeper would."""
    with session_scope(settings) as session:
        case_states.fail_case(session, case_id=case_id, attempt=None, code="timeout", message="test ending")


def fail_later(settings, case_id: uuid.UUID, delay: float) -> threading.Thread:  # type: ignore[no-untyped-def]
    """:func:`end_case` after ``delay`` seconds, on a thread of its own."""

    def end() -> None:
        time.sleep(delay)
        end_case(settings, case_id)

    thread = threading.Thread(target=end)
    thread.start()
    return thread


def reads_of(settings, case_id: uuid.UUID) -> int:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.scalar(
            select(func.count()).where(AuditEvent.action == "case.read", AuditEvent.entity_id == str(case_id))
        )


def test_submit_with_wait_answers_201_with_the_finished_case(client, worker, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    answer = client.post(
        "/v1/cases?wait=30", headers=tenant.headers, files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["status"] == "succeeded" and body["result"]["label"]
    assert answer.headers["Location"] == f"/v1/cases/{body['id']}"


def test_a_waiting_submission_reads_its_case_only_to_answer(
    client, worker, settings, tenant: Tenant, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """A new case cannot end before its waiting request holds its ticket (its task is sent after
    that), and the announcement of its end comes only after the commit: so the request does not
    look at the case's status before or after waiting, it only reads the finished case to answer."""
    client.get(f"/v1/cases/{uuid.uuid4()}?wait=0.1", headers=tenant.headers)
    listener = client.app.state.dermq.listener
    support.wait_for(lambda: listener.listening, timeout=20, what="the API's listener to connect")
    with support.statements_sent(settings) as statements:
        answer = client.post(
            "/v1/cases?wait=30", headers=tenant.headers, files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
        )
    assert answer.status_code == 201 and answer.json()["status"] == "succeeded", answer.text
    looks = [s for s in statements if s.startswith("SELECT cases.status FROM cases")]
    assert looks == [], looks


def test_a_waiting_read_is_woken_by_the_commit_that_ends_the_case(  # type: ignore[no-untyped-def]
    client, settings, tenant: Tenant, store_case
) -> None:
    case_id = store_case(tenant, b"never published")
    # Once the listener is connected a waiting request looks again only every 10 s on its own: an
    # answer within a few seconds can only come from the notification.
    client.get(f"/v1/cases/{case_id}?wait=0.1", headers=tenant.headers)
    listener = client.app.state.dermq.listener
    support.wait_for(lambda: listener.listening, timeout=20, what="the API's listener to connect")
    ender = fail_later(settings, case_id, 1.0)
    started = time.monotonic()
    answer = client.get(f"/v1/cases/{case_id}?wait=25", headers=tenant.headers)
    took = time.monotonic() - started
    ender.join()
    assert answer.status_code == 200 and answer.json()["status"] == "failed"
    assert 1.0 <= took < 8, f"answered after {took:.1f} s"  # woken by the commit, not by the 25 s
    assert reads_of(settings, case_id) == 2  # one audited read per request, however long it waited


def test_a_wait_that_runs_out_answers_with_the_case_as_it_is(client, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"still queued")
    started = time.monotonic()
    answer = client.get(f"/v1/cases/{case_id}?wait=1.5", headers=tenant.headers)
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert time.monotonic() - started >= 1.5


def test_nobody_waits_for_a_case_of_another_clinic(client, make_key, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"someone else's")
    started = time.monotonic()
    answer = client.get(f"/v1/cases/{case_id}?wait=10", headers=make_key("clinic").headers)
    assert answer.status_code == 404 and time.monotonic() - started < 5


def test_beyond_the_bound_a_request_answers_at_once(settings, database, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued")
    app = create_app(settings.model_copy(update={"long_poll_max_waiters": 0}))
    with TestClient(app) as http:
        started = time.monotonic()
        answer = http.get(f"/v1/cases/{case_id}?wait=10", headers=tenant.headers)
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("wait", ["-1", "31", "soon"])
def test_a_wait_out_of_bounds_is_a_422_problem(client, tenant: Tenant, wait: str) -> None:  # type: ignore[no-untyped-def]
    answer = client.get(f"/v1/cases/{uuid.uuid4()}?wait={wait}", headers=tenant.headers)
    assert answer.status_code == 422 and answer.headers["content-type"].startswith("application/problem+json")


def test_a_replayed_submission_waits_too(client, worker, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    headers = {**tenant.headers, "Idempotency-Key": f"visit-{uuid.uuid4().hex}"}
    files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
    first = client.post("/v1/cases", headers=headers, files=files)
    assert first.status_code == 202
    replay = client.post("/v1/cases?wait=30", headers=headers, files=files)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"] and replay.json()["status"] == "succeeded"


def test_a_waiting_submission_s_new_case_commits_without_the_disk_and_a_replay_with_it(  # type: ignore[no-untyped-def]
    client, settings, tenant: Tenant, jpeg_bytes
) -> None:
    """The case a waiting submission creates commits without waiting for the WAL flush (the answer
    follows the durable commit of its audited read); a replay of it, which may be answered from its
    own transaction, commits durably like every other answer (docs/OPERATIONS.md, "Durability")."""
    headers = tenant.headers | {"Idempotency-Key": f"durability-{uuid.uuid4().hex}"}
    files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
    # the commits of requests' threads (api.db.Lanes)
    with support.commit_settings(lambda: threading.current_thread().name.startswith("dermq-request")) as commits:
        first = client.post("/v1/cases?wait=0.2", headers=headers, files=files)
        created_commits, commits[:] = list(commits), []
        replay = client.post("/v1/cases?wait=0.2", headers=headers, files=files)
    assert first.status_code in (201, 202) and replay.status_code == 200, (first.text, replay.text)
    assert created_commits[0] == "off" and set(created_commits[1:]) == {"on"}, created_commits  # then the read
    assert commits and set(commits) == {"on"}, commits  # the replay, finished or not


def test_the_api_latency_an_operator_watches_leaves_out_the_long_polls_wait(client, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    """A portal's `?wait=` is the queue's and the model's time: counted as the API's, a few seconds
    of queue at peak read as a slow API (DermqApiLatencyHigh fired, and its runbook said to add API
    processes)."""
    from api.metrics import REGISTRY

    case_id = store_case(tenant, b"never published")  # stays queued: the poll waits its whole wait
    labels = {"route": "/v1/cases/{case_id}", "method": "GET"}

    def observed() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("dermq_http_request_duration_seconds_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("dermq_http_request_duration_seconds_sum", labels) or 0.0

    before = observed()
    started = time.monotonic()
    answer = client.get(f"/v1/cases/{case_id}?wait=1.5", headers=tenant.headers)
    took = time.monotonic() - started
    after = observed()
    assert answer.status_code == 200 and answer.json()["status"] == "queued" and took >= 1.5
    assert after[0] == before[0] + 1
    assert after[1] - before[1] < took - 1.4  # the request's own work, without the 1.5 s it waited


MARKER = "MRN-busy-0042"


def busy_submission(settings, api: TestClient, tenant: Tenant, headers: dict[str, str], image: bytes, hold: Any) -> Any:  # type: ignore[no-untyped-def]
    """The answer to ``POST /v1/cases?wait=3`` on ``api`` (whose task goes to a broker no worker reads:
    the case waits out the wait), while ``hold()``, a context manager entered once the case is
    committed, keeps the database busy for the wait's read. The case's client reference is ``MARKER``."""
    answers: list[Any] = []
    files, form = {"image": ("lesion.jpg", image, "image/jpeg")}, {"client_ref": MARKER}
    post = threading.Thread(
        target=lambda: answers.append(api.post("/v1/cases?wait=3", headers=headers, files=files, data=form))
    )
    watcher = create_engine(settings.database_url)
    post.start()
    try:
        with watcher.connect() as look:
            support.wait_for(
                lambda: look.scalar(text("SELECT count(*) FROM cases WHERE clinic_id = :c"), {"c": tenant.clinic_id}),
                timeout=30,
                what="the case to be committed",
            )
        with hold():
            post.join(30)
    finally:
        post.join(30)
        watcher.dispose()
    (answer,) = answers
    return answer


@contextmanager
def commits_of_requests() -> Iterator[list[tuple[str, int | None]]]:
    """For each commit on a request's thread (api.db.Lanes) while the block runs: its
    ``synchronous_commit`` and its transaction id (None if it has none: then it wrote nothing)."""
    seen: list[tuple[str, int | None]] = []

    def committed(connection: Any) -> None:
        if threading.current_thread().name.startswith("dermq-request"):
            asked = "SELECT current_setting('synchronous_commit'), pg_current_xact_id_if_assigned()::text::bigint"
            seen.append(tuple(connection.exec_driver_sql(asked).one()))  # type: ignore[arg-type]

    event.listen(Engine, "commit", committed)
    try:
        yield seen
    finally:
        event.remove(Engine, "commit", committed)


def test_a_stored_case_whose_wait_meets_a_busy_database_is_answered_as_stored_once_on_disk(  # type: ignore[no-untyped-def]
    settings, database, private_broker, tenant: Tenant, jpeg_bytes: bytes
) -> None:
    """The wait's read times out on a lock (its audit event waits for another transaction): the case
    is answered as stored (a 503 saying that nothing was stored had a portal without an
    Idempotency-Key send it again), but only after a commit that waits for the disk. The 202 came on
    the case's own commit, which does not wait for it: a Postgres crash right after the answer could
    take an accepted case."""
    busy = settings.model_copy(update={"database_lock_timeout_ms": 200, "redis_url": private_broker.url})
    locker = create_engine(settings.database_url)

    @contextmanager
    def audit_table_held() -> Iterator[None]:  # by another transaction: the read's audit event waits for it
        with locker.connect() as connection:
            connection.execute(text("LOCK TABLE audit_events IN SHARE MODE"))
            yield
            connection.rollback()

    headers = tenant.headers | {"Idempotency-Key": f"busy-{uuid.uuid4().hex}"}
    try:
        with TestClient(create_app(busy), raise_server_exceptions=False) as api, commits_of_requests() as commits:
            answer = busy_submission(settings, api, tenant, headers, jpeg_bytes, audit_table_held)
    finally:
        locker.dispose()
    assert answer.status_code == 202, answer.text
    case = answer.json()
    assert answer.headers["location"] == f"/v1/cases/{case['id']}"
    assert case["status"] == "queued" and case["client_ref"] == MARKER
    assert commits[0][0] == "off" and commits[0][1], commits  # the case, not waiting for the disk
    # The last commit before the answer waits for the disk and wrote to the WAL (a transaction that
    # writes nothing commits without waiting, whatever its setting): it locked the case's row. Its
    # flush takes the case's commit with it.
    setting, xid = commits[-1]
    with session_scope(settings) as session:
        locked_by = session.scalar(text("SELECT xmax::text::bigint FROM cases WHERE id = :id"), {"id": case["id"]})
    assert setting == "on" and xid is not None and locked_by == xid % 2**32, (commits, locked_by)
    assert reads_of(settings, case["id"]) == 0  # the read's audit event never committed: nothing was read


def test_a_stored_case_whose_wait_finds_no_connection_at_all_is_a_503_and_a_retry_gets_it(  # type: ignore[no-untyped-def]
    settings, database, private_broker, tenant: Tenant, jpeg_bytes: bytes
) -> None:
    """The API's one connection is taken for the rest of the request once the case is committed: it
    cannot be confirmed on disk, so it is not answered as accepted; the same request again, with its
    Idempotency-Key, gets the case, never a second one."""
    from core.db import get_engine

    busy = settings.model_copy(
        update={"database_pool_size": 1, "database_pool_timeout_s": 0.3, "redis_url": private_broker.url}
    )
    engine = get_engine(busy)
    headers = tenant.headers | {"Idempotency-Key": f"busy-{uuid.uuid4().hex}"}

    @contextmanager
    def connection_held() -> Iterator[None]:  # by another request that is slow to finish
        with engine.connect():
            yield

    try:
        with TestClient(create_app(busy), raise_server_exceptions=False) as api:
            answer = busy_submission(settings, api, tenant, headers, jpeg_bytes, connection_held)
            files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
            retried = api.post("/v1/cases", headers=headers, files=files, data={"client_ref": MARKER})
    finally:
        engine.dispose()
    assert (answer.status_code, answer.json()["code"]) == (503, "database_busy"), answer.text
    assert "was stored" in answer.json()["detail"] and answer.headers["retry-after"] == "1"
    # where to find it, for a portal that sent no Idempotency-Key and must not send the image again
    case_id = answer.json()["case_id"]
    assert answer.headers["location"] == f"/v1/cases/{case_id}"
    assert retried.status_code == 200 and retried.headers["idempotent-replayed"] == "true", retried.text
    assert retried.json()["id"] == case_id
    with session_scope(settings) as session:
        stored = session.scalars(
            select(AuditEvent.entity_id).where(
                AuditEvent.action == "case.create", AuditEvent.clinic_id == tenant.clinic_id
            )
        ).all()
    assert stored == [retried.json()["id"]]  # one case
