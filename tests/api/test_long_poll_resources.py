"""What a long poll holds while it waits, and what it checks when it wakes: no request thread and none
of its upload while waiting, and no answer for a key revoked meanwhile."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from api.app import create_app
from core import keys
from core.db import session_scope
from core.models import AuditEvent, Case
from tests import support
from tests.api.test_long_poll import end_case
from tests.conftest import Tenant


def waiting(http: TestClient) -> int:
    return int(http.app.state.dermq.waiters.waiting)  # type: ignore[attr-defined]


def request_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("dermq-request"))


def cases_of(settings, tenant: Tenant) -> list[uuid.UUID]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return list(session.scalars(select(Case.id).where(Case.clinic_id == tenant.clinic_id)))


def case_of(settings, tenant: Tenant) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """The clinic's one case, once its submission has committed it (a waiting submission's ticket is
    taken just before that commit)."""
    (case_id,) = support.wait_for(lambda: cases_of(settings, tenant) or None, timeout=20, what="the case's commit")
    return case_id


def events(settings, action: str, entity_id: str | None = None, key_id: uuid.UUID | None = None) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if entity_id is not None:
            query = query.where(AuditEvent.entity_id == entity_id)
        if key_id is not None:
            query = query.where(AuditEvent.actor_key_id == key_id)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def start_one_by_one(pool: ThreadPoolExecutor, http: TestClient, calls: list[Callable[[], Any]]) -> list[Future[Any]]:
    """Start each call once the one before it is waiting."""
    futures = []
    for number, call in enumerate(calls, start=1):
        futures.append(pool.submit(call))
        support.wait_for(lambda n=number: waiting(http) >= n, timeout=30, what=f"{number} waiting requests")
    return futures


def test_waiting_requests_hold_no_request_thread(
    waiting_client: TestClient, settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued, never published")
    before = request_threads()
    count = 12
    with ThreadPoolExecutor(count) as pool:
        get = lambda: waiting_client.get(f"/v1/cases/{case_id}?wait=25", headers=tenant.headers)  # noqa: E731
        futures = start_one_by_one(pool, waiting_client, [get] * count)
        assert waiting(waiting_client) == count
        # each request took a thread for its authentication, its limit and its look, and gave it back
        assert request_threads() - before <= 2, (before, request_threads())
        end_case(settings, case_id)
        answers = [f.result(timeout=30) for f in futures]
    assert [a.status_code for a in answers] == [200] * count
    assert {a.json()["status"] for a in answers} == {"failed"}


def noisy_jpeg(side: int = 1400) -> bytes:
    """About 2 MB: noise does not compress."""
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_waiting_submissions_keep_none_of_their_uploads(waiting_client: TestClient, settings, make_key) -> None:  # type: ignore[no-untyped-def]
    image = noisy_jpeg()
    assert len(image) > 1_500_000
    tenants = [make_key("clinic") for _ in range(4)]

    def submit(tenant: Tenant) -> Callable[[], Any]:
        files = {"image": ("lesion.jpg", image, "image/jpeg")}
        return lambda: waiting_client.post("/v1/cases?wait=25", headers=tenant.headers, files=files)

    tracemalloc.start()
    try:
        with ThreadPoolExecutor(len(tenants)) as pool:
            futures = start_one_by_one(pool, waiting_client, [submit(t) for t in tenants])
            # what the intake read from the bodies (api.upload joins each image's chunks) is gone
            held = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/api/upload.py")])
            bytes_held = sum(stat.size for stat in held.statistics("filename"))
            for tenant in tenants:
                end_case(settings, case_of(settings, tenant))
            answers = [f.result(timeout=30) for f in futures]
    finally:
        tracemalloc.stop()
    assert [a.status_code for a in answers] == [201] * len(tenants), [a.text for a in answers]  # ended: failed
    assert bytes_held < len(image), bytes_held


def revoke(settings, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        keys.revoke_key(session, tenant.key_id)


def test_a_key_revoked_while_its_read_waits_gets_no_answer(
    waiting_client: TestClient, settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued")
    with ThreadPoolExecutor(1) as pool:
        get = lambda: waiting_client.get(f"/v1/cases/{case_id}?wait=25", headers=tenant.headers)  # noqa: E731
        (future,) = start_one_by_one(pool, waiting_client, [get])
        revoke(settings, tenant)
        end_case(settings, case_id)
        answer = future.result(timeout=30)
    assert answer.status_code == 401 and answer.json()["code"] == "revoked_credentials", answer.text
    assert not {"id", "result", "client_ref"} & set(answer.json())  # a problem, no case
    assert events(settings, "case.read", entity_id=str(case_id)) == []
    (denied,) = events(settings, "auth.denied", key_id=tenant.key_id)
    assert denied.detail == {"reason": "revoked_credentials", "after": "wait"}


def test_a_key_revoked_while_its_submission_waits_gets_no_answer(
    waiting_client: TestClient, settings, tenant: Tenant, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
    with ThreadPoolExecutor(1) as pool:
        post = lambda: waiting_client.post("/v1/cases?wait=25", headers=tenant.headers, files=files)  # noqa: E731
        (future,) = start_one_by_one(pool, waiting_client, [post])
        case_id = case_of(settings, tenant)
        revoke(settings, tenant)
        end_case(settings, case_id)
        answer = future.result(timeout=30)
    assert answer.status_code == 401 and answer.json()["code"] == "revoked_credentials", answer.text
    assert events(settings, "case.read", entity_id=str(case_id)) == []
    with session_scope(settings) as session:  # the case itself was accepted before the revocation
        assert session.scalar(select(func.count()).where(Case.id == case_id)) == 1


def test_a_case_erased_while_its_read_waits_answers_at_once(  # type: ignore[no-untyped-def]
    waiting_client: TestClient, tenant: Tenant, store_case
) -> None:
    case_id = store_case(tenant, b"queued, then erased")
    with ThreadPoolExecutor(1) as pool:
        get = lambda: waiting_client.get(f"/v1/cases/{case_id}?wait=25", headers=tenant.headers)  # noqa: E731
        (future,) = start_one_by_one(pool, waiting_client, [get])
        erased = waiting_client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
        assert erased.status_code == 200, erased.text
        started = time.monotonic()
        answer = future.result(timeout=30)
    # woken by the erasure's commit, not by its own look 10 s later
    assert time.monotonic() - started < 5
    assert answer.status_code == 200 and answer.json()["status"] == "purged"


def test_one_clinic_takes_at_most_a_quarter_of_the_places_to_wait(  # type: ignore[no-untyped-def]
    settings, database, private_broker, make_key, store_case
) -> None:
    # the places are the process's: one clinic's burst of long polls took them all, and every other
    # clinic's waits answered at once
    app = create_app(settings.model_copy(update={"redis_url": private_broker.url, "long_poll_max_waiters": 8}))
    busy, other = make_key(), make_key()
    case, their_case = store_case(busy, b"queued, never published"), store_case(other, b"queued too")
    with TestClient(app, raise_server_exceptions=False) as http, ThreadPoolExecutor(3) as pool:
        wait = lambda tenant, case_id: lambda: http.get(f"/v1/cases/{case_id}?wait=25", headers=tenant.headers)  # noqa: E731
        futures = start_one_by_one(pool, http, [wait(busy, case), wait(busy, case)])
        assert waiting(http) == 2
        started = time.monotonic()
        third = http.get(f"/v1/cases/{case}?wait=25", headers=busy.headers)
        assert third.status_code == 200 and third.json()["status"] == "queued"
        assert time.monotonic() - started < 10  # answered at once, not after the wait
        futures.append(pool.submit(wait(other, their_case)))  # another clinic's request still waits
        support.wait_for(lambda: waiting(http) == 3, timeout=30, what="the other clinic's request to wait")
        end_case(settings, case)
        end_case(settings, their_case)
        assert [f.result(timeout=30).json()["status"] for f in futures] == ["failed"] * 3
