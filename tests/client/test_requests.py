"""How the client shapes requests and reacts to answers the real stack gives only under faults (503
with Retry-After, a proxy's HTML 502) or that another endpoint serves: httpx.MockTransport stands
in for the server here, and only here."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from dermq_client import Client, RetryPolicy, ServerError, ServiceUnavailable

CASE_ID = str(uuid.uuid4())


def case_json(status: str = "queued") -> dict[str, object]:
    return {
        "id": CASE_ID,
        "status": status,
        "priority": "routine",
        "client_ref": None,
        "attempts": 0,
        "image": None,
        "created_at": "2026-12-01T10:00:00Z",
        "updated_at": "2026-12-01T10:00:00Z",
        "started_at": None,
        "finished_at": None,
        "result": None,
        "failure": None,
        "links": {"self": f"/v1/cases/{CASE_ID}", "heatmap": None},
    }


def test_report_outcome_posts_the_diagnosis_and_method() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"case_id": CASE_ID, "diagnosis": "mel", "method": "histo"})

    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        answer = dermq.report_outcome(CASE_ID, "mel", "histo")
    assert answer["diagnosis"] == "mel"
    (request,) = seen
    assert request.method == "POST" and request.url.path == f"/v1/cases/{CASE_ID}/outcome"
    assert request.headers["Authorization"] == "Bearer dq_key"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"diagnosis": "mel", "method": "histo"}


def test_a_503_is_retried_after_retry_after_with_the_same_key() -> None:
    keys: list[str] = []
    times: list[float] = []

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        times.append(time.monotonic())
        if len(keys) == 1:
            return httpx.Response(
                503,
                headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
                json={"status": 503, "code": "database_unavailable", "detail": "down", "request_id": "r1"},
            )
        return httpx.Response(202, json=case_json())

    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        case = dermq.submit(b"image bytes", client_ref="ref")
    assert case.id == CASE_ID and keys[0] == keys[1]
    assert times[1] - times[0] >= 0.95  # Retry-After honoured


def test_retries_are_bounded_and_the_last_error_is_raised() -> None:
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(502, text="<html>bad gateway</html>")

    policy = RetryPolicy(attempts=3, backoff=0.01)
    transport = httpx.MockTransport(server)
    with (
        Client("http://dermq.test", "dq_key", transport=transport, retry=policy) as dermq,
        pytest.raises(ServerError) as failed,
    ):
        dermq.get(CASE_ID)
    assert calls == 3 and failed.value.status == 502 and not isinstance(failed.value, ServiceUnavailable)


def test_a_retry_after_longer_than_the_policy_allows_is_raised_at_once() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "3600"}, json={"code": "database_unavailable"})

    dermq = Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server))
    with dermq, pytest.raises(ServiceUnavailable) as failed:
        dermq.get(CASE_ID)
    assert failed.value.retry_after == 3600 and failed.value.code == "database_unavailable"


def test_submit_sends_a_neutral_file_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bodies: list[bytes] = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(202, json=case_json())

    image = tmp_path / "Jane Doe 1970-01-01.JPG"
    image.write_bytes(b"jpeg bytes")
    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        dermq.submit(image, priority="urgent")
        with pytest.raises(ValueError):
            dermq.submit(image, priority="asap")
    (body,) = bodies
    assert b'filename="image.jpg"' in body and b"Jane" not in body and b'name="priority"\r\n\r\nurgent' in body
