"""The client where a portal's developer would trip: a replayed submission followed to its end, an
upload the server already spent its whole upload time on, an answer httpx cannot read, the list's
filters and worklist fields. httpx.MockTransport stands in for the server (as in test_requests.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from dermq_client import AsyncClient, Client, ConnectionFailed, RequestTimeout, RetryPolicy, UnexpectedResponse

from tests.client.test_requests import CASE_ID, case_json
from tests.local_site import QuietHandler, serving


@pytest.mark.parametrize("client_kind", ["blocking", "asyncio"])
def test_a_replayed_submission_followed_to_its_end_is_still_marked_replayed(client_kind: str) -> None:
    """The POST answered 200 Idempotent-Replayed with the case still queued; the case returned after
    the long polls that followed must still say the submission found an existing case."""

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, headers={"Idempotent-Replayed": "true"}, json=case_json("queued"))
        return httpx.Response(200, json=case_json("failed") | {"failure": {"code": "timeout", "message": ""}})

    transport = httpx.MockTransport(server)
    if client_kind == "blocking":
        with Client("http://dermq.test", "dq_key", transport=transport) as dermq:
            case = dermq.submit(b"image bytes", idempotency_key="visit-1", wait=5)
    else:

        async def flow():  # type: ignore[no-untyped-def]
            async with AsyncClient("http://dermq.test", "dq_key", transport=transport) as dermq:
                return await dermq.submit(b"image bytes", idempotency_key="visit-1", wait=5)

        case = asyncio.run(flow())
    assert case.status == "failed" and case.replayed


def test_an_upload_the_server_spent_its_whole_upload_time_on_is_not_sent_again() -> None:
    """408 ``upload_timeout``: 300 s went into that upload; three more would hold the caller 20 minutes
    (``upload_stalled``, nothing arriving for a while, is still retried: test_requests.py)."""
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        problem = {"status": 408, "code": "upload_timeout", "detail": "not complete after 300 s"}
        return httpx.Response(408, headers={"Content-Type": "application/problem+json"}, json=problem)

    policy = RetryPolicy(attempts=4, backoff=0.01)
    with (
        Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server), retry=policy) as dermq,
        pytest.raises(RequestTimeout) as gave_up,
    ):
        dermq.submit(b"image bytes")
    assert gave_up.value.code == "upload_timeout" and calls == 1


def test_an_answer_httpx_cannot_read_is_an_unexpected_response_not_a_traceback() -> None:
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:  # a proxy's broken compression
        nonlocal calls
        calls += 1
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip at all")

    with (
        Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq,
        pytest.raises(UnexpectedResponse, match="DecodingError"),
    ):
        dermq.get(CASE_ID)
    assert calls == 1


@pytest.mark.parametrize("key", ["visit-Müller", "x" * 256, "with space", ""])
def test_an_idempotency_key_the_server_would_refuse_is_refused_before_sending(key: str) -> None:
    # an empty one too: it was swapped for a random key, so each resubmission made a new case
    def server(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with (
        Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq,
        pytest.raises(ValueError, match="idempotency key") as refused,
    ):
        dermq.submit(b"image bytes", idempotency_key=key)
    assert not key or key not in str(refused.value)  # the key may be built from patient data: not repeated

    async def submit_async() -> None:
        async with AsyncClient("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
            await dermq.submit(b"image bytes", idempotency_key=key)

    with pytest.raises(ValueError, match="idempotency key"):
        asyncio.run(submit_async())


def test_the_list_filters_and_its_worklist_fields() -> None:
    asked: list[httpx.QueryParams] = []
    row = case_json("succeeded") | {"outcome": "diagnosis", "label": "mel", "referral": True}
    row.pop("result")

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params)
        return httpx.Response(200, json={"items": [row], "next_cursor": None})

    since, until = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        rows = list(dermq.iter_cases(status="succeeded", priority="urgent", since=since, until=until))
    assert dict(asked[0]) == {
        "status": "succeeded",
        "priority": "urgent",
        "since": "2026-11-01T00:00:00+00:00",
        "until": "2026-12-01T00:00:00+00:00",
    }
    assert [(r.id, r.outcome, r.label, r.referral) for r in rows] == [(CASE_ID, "diagnosis", "mel", True)]
    assert uuid.UUID(rows[0].id)


def test_limits_bound_the_connections_a_client_holds() -> None:
    """Each waiting call holds a connection; ``limits`` bounds how many, and a call past them fails
    with ConnectionFailed (PoolTimeout) once the pool's timeout passes."""
    release, arrived = threading.Event(), threading.Event()

    class Slow(QuietHandler):
        def do_GET(self) -> None:
            arrived.set()
            release.wait(10)
            self.answer(200, "application/json", json.dumps(case_json()).encode())

    timeout = httpx.Timeout(10, pool=0.3)
    limits = httpx.Limits(max_connections=1)
    with serving(Slow) as url:
        dermq = Client(url, "dq_key", timeout=timeout, limits=limits, retry=RetryPolicy(attempts=1))
        first = threading.Thread(target=dermq.get, args=(CASE_ID,))
        try:
            first.start()
            assert arrived.wait(10)  # the first call holds the one connection
            with pytest.raises(ConnectionFailed, match="PoolTimeout"):
                dermq.get(CASE_ID)
        finally:
            release.set()
            first.join(10)
            dermq.close()


def test_a_key_read_with_its_newline_works_and_a_malformed_key_is_never_repeated() -> None:
    """A key from a file or a secret made from one ends with a newline: sent as it was, httpx refused
    the header with an error quoting the whole key, which the client reported (and retried) as a
    connection failure. Now it is stripped; a key with a character outside visible ASCII is refused
    before anything is sent, with a message that does not repeat it."""
    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json=case_json("queued"))

    with Client("http://dermq.test", "dq_secret-key\n", transport=httpx.MockTransport(server)) as dermq:
        dermq.get(CASE_ID)
    assert seen == ["Bearer dq_secret-key"]
    for malformed in ("dq_secret key", "dq_secret\u200bkey", "dq_secret\x7fkey"):
        for make in (Client, AsyncClient):
            with pytest.raises(ValueError) as refused:
                make("http://dermq.test", malformed, transport=httpx.MockTransport(server))  # type: ignore[arg-type]
            assert "secret" not in str(refused.value)
    assert len(seen) == 1


def test_a_redirect_says_to_check_the_base_url_and_is_not_followed_or_retried() -> None:
    """A proxy in front answers http:// with a redirect to https://: a plain "Moved Permanently"
    error sent the developer nowhere."""
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(301, headers={"Location": "https://dermq.test/v1/cases/x"})

    with (
        Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq,
        pytest.raises(UnexpectedResponse) as redirected,
    ):
        dermq.get(CASE_ID)
    assert calls == 1 and redirected.value.status == 301
    assert "https://dermq.test/v1/cases/x" in str(redirected.value) and "base URL" in str(redirected.value)


def test_a_case_repr_leaves_out_the_clinic_reference() -> None:
    """``log.info("case %s", case)`` must not write the clinic's reference (an MRN) to a log."""

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=case_json("queued") | {"client_ref": "MRN-0042"})

    with Client("http://dermq.test", "dq_key", transport=httpx.MockTransport(server)) as dermq:
        case = dermq.get(CASE_ID)
    assert case.client_ref == "MRN-0042" and "MRN-0042" not in repr(case)
