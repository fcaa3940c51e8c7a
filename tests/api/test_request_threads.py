"""The API's database work per request, through its real HTTP routes on the real Postgres: one
Session per request (authentication and the route share it), used on one thread of its own, and that
thread kept for the next request rather than a new one started."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


@contextlib.contextmanager
def threads_per_session() -> Iterator[dict[Session, set[tuple[str | None, threading.Thread]]]]:
    """Every Session used meanwhile in this process (begun, executed, flushed, committed or rolled
    back), with the (request id, thread) of each use: the request id the API gave the request whose
    work it was (``X-Request-ID``), None outside a request."""
    from core.logs import request_id_var

    used: dict[Session, set[tuple[str | None, threading.Thread]]] = {}

    def note(session: Session) -> None:
        used.setdefault(session, set()).add((request_id_var.get(), threading.current_thread()))

    hooks = {
        "after_begin": lambda session, *_: note(session),
        "do_orm_execute": lambda state: note(state.session),
        "after_flush": lambda session, *_: note(session),
        "after_commit": note,
        "after_soft_rollback": lambda session, *_: note(session),
    }
    for name, hook in hooks.items():
        event.listen(Session, name, hook)
    try:
        yield used
    finally:
        for name, hook in hooks.items():
            event.remove(Session, name, hook)


def test_each_request_uses_one_session_on_one_thread(client, tenant: Tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    with threads_per_session() as used:
        created = client.post(
            "/v1/cases",
            headers=tenant.headers,
            files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
            data={"client_ref": "thread check"},
        )
        assert created.status_code == 202, created.text
        case_id = created.json()["id"]
        replayed = client.post(
            "/v1/cases",
            headers={**tenant.headers, "Idempotency-Key": f"threads-{uuid.uuid4().hex}"},
            files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
        )
        assert replayed.status_code == 202
        responses = [
            created,
            replayed,
            client.get(f"/v1/cases/{case_id}", headers=tenant.headers),
            client.get("/v1/cases?limit=2", headers=tenant.headers),
            client.get("/v1/clinic/callback", headers=tenant.headers),
            client.delete(f"/v1/cases/{case_id}", headers=tenant.headers),
        ]
    assert [r.status_code for r in responses[2:]] == [200, 200, 404, 200]
    # one Session per request (authentication and the route share it), used on one thread of its own;
    # Sessions of other work in this process meanwhile (no request, or another one) are not ours
    ours = [r.headers["X-Request-ID"] for r in responses]
    sessions: dict[str, list[set[threading.Thread]]] = {request: [] for request in ours}
    for uses in used.values():
        requests = {request for request, _ in uses}
        if requests & set(ours):
            assert len(requests) == 1, f"one Session served several requests: {requests}"
            sessions[requests.pop()].append({thread for _, thread in uses})
    for request, threads in sessions.items():
        assert len(threads) == 1, f"request {request} used {len(threads)} Sessions"
        assert len(threads[0]) == 1 and next(iter(threads[0])).name.startswith("dermq-request"), threads


def test_requests_one_after_another_reuse_one_database_thread(client, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    """A request's database thread is kept for the next request instead of a new one being started."""
    threads: set[threading.Thread] = set()  # the Thread objects themselves: an ident can be reused

    def note(session: Session, *_: object) -> None:
        if threading.current_thread().name.startswith("dermq-request"):
            threads.add(threading.current_thread())

    event.listen(Session, "after_begin", note)
    try:
        for _ in range(5):
            assert client.get("/v1/cases?limit=1", headers=tenant.headers).status_code == 200
    finally:
        event.remove(Session, "after_begin", note)
    assert len(threads) == 1
