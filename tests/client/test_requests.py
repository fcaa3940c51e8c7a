"""How the client shapes requests and reacts to answers the real stack gives only under faults (503
with Retry-After, a proxy's HTML 502) or that another endpoint serves: httpx.MockTransport stands
in for the server here, and only here."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from dermq_client import (
    AsyncClient,
    Client,
    DermqError,
    RequestTimeout,
    RetryPolicy,
    ServerError,
    ServiceUnavailable,
    UnexpectedResponse,
)

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


def test_an_upload_the_server_gave_up_on_408_is_sent_again_with_the_same_key() -> None:
    keys: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:  # the first upload stalled on the way
            return httpx.Response(
                408,
                headers={"Content-Type": "application/problem+json"},
                json={"status": 408, "code": "upload_stalled", "detail": "nothing for 30 s", "request_id": "r1"},
            )
        return httpx.Response(202, json=case_json())

    policy = RetryPolicy(attempts=2, backoff=0.01)
    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server), retry=policy) as dermq:
        case = dermq.submit(b"image bytes")
    assert case.id == CASE_ID and len(keys) == 2 and keys[0] == keys[1]

    keys.clear()
    with (
        Client(
            "http://dermq.test", "dq_key", transport=httpx.MockTransport(server), retry=RetryPolicy(attempts=1)
        ) as dermq,
        pytest.raises(RequestTimeout) as gave_up,
    ):
        dermq.submit(b"image bytes")
    assert gave_up.value.code == "upload_stalled" and gave_up.value.status == 408


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


@pytest.mark.parametrize(
    ("local_name", "sent_name", "media_type"),
    [
        ("Smith.MRN0042", "image", "application/octet-stream"),
        ("lesion.Smith-1970", "image", "application/octet-stream"),
        ("scan.TIFF", "image.tiff", "image/tiff"),
        ("lesion.webp", "image.webp", "image/webp"),
        ("no suffix", "image", "application/octet-stream"),
    ],
)
def test_only_a_known_image_suffix_of_the_local_name_is_sent(
    tmp_path: Path, local_name: str, sent_name: str, media_type: str
) -> None:
    bodies: list[bytes] = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(202, json=case_json())

    image = tmp_path / local_name
    image.write_bytes(b"image bytes")
    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        dermq.submit(image)
    (body,) = bodies
    assert f'filename="{sent_name}"\r\nContent-Type: {media_type}\r\n'.encode() in body
    assert b"Smith" not in body and b"MRN" not in body.upper()


HTML_PAGE = httpx.Response(200, text="<!doctype html><title>Example</title>", headers={"Content-Type": "text/html"})


@pytest.mark.parametrize(
    "answer",
    [
        HTML_PAGE,
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"some": "other API"}),
        httpx.Response(200, json={"items": "not a list"}),
    ],
    ids=["html", "json_list", "json_other", "items_not_a_list"],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda dermq: dermq.get(CASE_ID),
        lambda dermq: list(dermq.iter_cases()),
        lambda dermq: dermq.erase(CASE_ID),
        lambda dermq: dermq.submit(b"image bytes"),
        lambda dermq: dermq.heatmap(CASE_ID),
        lambda dermq: dermq.wait(CASE_ID, timeout=5),
    ],
    ids=["get", "iter_cases", "erase", "submit", "heatmap", "wait"],
)
def test_an_answer_that_is_not_dermqs_is_an_unexpected_response(answer: httpx.Response, call) -> None:  # type: ignore[no-untyped-def]
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    dermq = Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server))
    with dermq, pytest.raises(UnexpectedResponse, match=r"not a dermq answer.*check the base URL") as raised:
        call(dermq)
    assert isinstance(raised.value, DermqError) and raised.value.status == 200 and calls == 1


def test_report_outcome_with_an_html_answer_is_an_unexpected_response() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=HTML_PAGE.headers, content=HTML_PAGE.content)

    dermq = Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server))
    with dermq, pytest.raises(UnexpectedResponse, match="text/html"):
        dermq.report_outcome(CASE_ID, "mel", "histo")


def test_the_async_client_raises_unexpected_response_too() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=HTML_PAGE.headers, content=HTML_PAGE.content)

    async def flow() -> None:
        async with AsyncClient("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
            with pytest.raises(UnexpectedResponse):
                await dermq.get(CASE_ID)
            with pytest.raises(UnexpectedResponse):
                [row async for row in dermq.iter_cases()]

    asyncio.run(flow())


@pytest.mark.parametrize("base_url", ["http://[::1", "dermq.example", "ftp://dermq.example", "http://"])
def test_an_unusable_base_url_is_a_value_error(base_url: str) -> None:
    with pytest.raises(ValueError, match="invalid base URL"):
        Client(base_url, "dq_key")
    with pytest.raises(ValueError, match="invalid base URL"):
        AsyncClient(base_url, "dq_key")
