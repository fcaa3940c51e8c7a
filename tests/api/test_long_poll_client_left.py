"""A long poll whose client goes away: the request stops waiting at once, gives its place back, and
writes no audited read for an answer nobody would receive (its status, 499, reaches the metrics).

The requests are driven over ASGI as uvicorn drives them, so that the client can hang up at a chosen
moment: once the request waits. Before, such a request waited out its ``?wait=`` (up to 30 s) holding
one of its clinic's places, then recorded a read of the case that was never delivered."""

from __future__ import annotations

import socket
import time
from typing import Any

import anyio
import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.metrics import REGISTRY
from core.db import session_scope
from core.models import Case
from tests import support
from tests.api.test_long_poll import reads_of
from tests.conftest import Tenant

#: far beyond the moment the client leaves: an answer before it can only come from noticing that
WAIT = 30


def waiting(http: TestClient) -> int:
    return int(http.app.state.dermq.waiters.waiting)  # type: ignore[attr-defined]


def left_requests(route: str, method: str) -> float:
    sample = REGISTRY.get_sample_value("dermq_http_requests_total", {"route": route, "method": method, "status": "499"})
    return sample or 0.0


def hang_up_once_waiting(http: TestClient, request: httpx.Request) -> tuple[int | None, float]:
    """Send ``request`` to the app as uvicorn would; once the app holds a waiting request, the client
    disconnects. The status the app answered with (None if none) and the seconds it took."""
    body = request.read()
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.url.path,
        "raw_path": request.url.raw_path.split(b"?")[0],
        "query_string": request.url.query,
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.headers.raw],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": dict(http.app_state),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        while not waiting(http):  # the state the hang-up waits for: the request is waiting for its case
            await anyio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def run() -> None:
        with anyio.fail_after(WAIT / 2):  # the request must not wait out its ?wait= for a client that left
            await http.app(scope, receive, send)

    started = time.monotonic()
    assert http.portal is not None
    http.portal.call(run)
    return (statuses[0] if statuses else None), time.monotonic() - started


def test_a_long_poll_whose_client_leaves_stops_and_records_no_read(
    waiting_client: TestClient, settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued, never published")
    before = left_requests("/v1/cases/{case_id}", "GET")
    request = waiting_client.build_request("GET", f"/v1/cases/{case_id}?wait={WAIT}", headers=tenant.headers)
    status, took = hang_up_once_waiting(waiting_client, request)
    assert status == 499 and took < WAIT / 2
    assert waiting(waiting_client) == 0  # its place is free for another request
    assert reads_of(settings, case_id) == 0
    assert left_requests("/v1/cases/{case_id}", "GET") == before + 1
    # the same request from a client that stays is answered, and its read recorded
    answer = waiting_client.get(f"/v1/cases/{case_id}?wait=0.5", headers=tenant.headers)
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert reads_of(settings, case_id) == 1


def test_a_waiting_submission_whose_client_leaves_keeps_its_case_and_records_no_read(
    waiting_client: TestClient, settings, make_key, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    request = waiting_client.build_request(
        "POST",
        f"/v1/cases?wait={WAIT}",
        headers=tenant.headers,
        files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
    )
    status, took = hang_up_once_waiting(waiting_client, request)
    assert status == 499 and took < WAIT / 2
    assert waiting(waiting_client) == 0
    with session_scope(settings) as session:
        cases = list(session.scalars(select(Case).where(Case.clinic_id == tenant.clinic_id)))
        stored = [(case.id, case.status) for case in cases]
    # accepted before the client left: stored and queued (a retry with its Idempotency-Key finds it)
    assert [status for _, status in stored] == ["queued"]
    assert reads_of(settings, stored[0][0]) == 0


def test_uvicorn_tells_a_waiting_request_that_its_client_hung_up(
    live_api: str, settings, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    """The same over a real socket to the API's uvicorn: the request ends 499 long before its wait."""
    from tests.api.test_metrics import scrape, total
    from tests.conftest import live_api_process

    metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: httpx.get(metrics, timeout=5).status_code == 200, timeout=30, what="the API's metrics")

    def hung_up() -> float:
        return total(scrape(metrics), "dermq_http_requests_total", route="/v1/cases/{case_id}", status="499")

    before = hung_up()
    case_id = store_case(tenant, b"queued, never published")
    url = httpx.URL(live_api)
    with socket.create_connection((url.host, url.port or 80), timeout=5) as client:
        client.sendall(
            f"GET /v1/cases/{case_id}?wait={WAIT} HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Authorization: Bearer {tenant.token}\r\n\r\n".encode()
        )
    support.wait_for(lambda: hung_up() > before, timeout=WAIT / 2, what="the request to end 499")
    assert reads_of(settings, case_id) == 0
