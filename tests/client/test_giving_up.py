"""When the client gives up, and what it leaves the caller to go on with: a submission's errors carry
the idempotency key it sent (a portal that submits again with a new key makes a second case for one
lesion); a portal sending many images at once queues behind its own clinic's uploads (an API process
takes 4 at a time) instead of failing; ``wait`` says a lasting failure before its first answer and
keeps the last poll's error after one. httpx.MockTransport stands in for the server (as in
test_requests.py), and a closed port for an API that is down."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from dermq_client import AsyncClient, Client, ConnectionFailed, RateLimited, RetryPolicy, Unauthorized, WaitTimeout
from dermq_client._core import LATE_ANSWER
from dermq_client.cli import main

from tests.client.test_requests import CASE_ID, case_json
from tests.local_site import QuietHandler, serving

BUSY = {"type": "about:blank", "status": 429, "code": "rate_limited", "detail": "this clinic already has 4 uploads"}


def busy_then_accepted(busy: int, keys: list[str]):  # type: ignore[no-untyped-def]
    """A server whose upload slots are taken for the first ``busy`` submissions it sees."""

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) <= busy:
            return httpx.Response(429, headers={"Retry-After": "0"}, json=BUSY)
        return httpx.Response(202, json=case_json("queued"))

    return server


def test_many_images_at_once_queue_behind_the_clinics_uploads_instead_of_failing() -> None:
    """asyncio.gather of 12 submissions against 4 upload slots: the 8 over answered 429 (Retry-After
    1 s) were retried 3 times and raised RateLimited about 3 s in."""
    taken = 0
    keys: list[str] = []

    async def server(request: httpx.Request) -> httpx.Response:
        nonlocal taken
        keys.append(request.headers["Idempotency-Key"])
        if taken >= 4:
            return httpx.Response(429, headers={"Retry-After": "0.05"}, json=BUSY)
        taken += 1
        try:
            await asyncio.sleep(0.3)  # the upload
        finally:
            taken -= 1
        return httpx.Response(202, json=case_json("queued"))

    policy = RetryPolicy(attempts=4, backoff=0.01)

    async def portal() -> list[str]:
        async with AsyncClient("http://dermq.test", "dq_key", transport=httpx.MockTransport(server), retry=policy) as c:
            cases = await asyncio.gather(*(c.submit(b"image bytes", idempotency_key=f"visit-{n}") for n in range(12)))
        return [case.status for case in cases]

    assert asyncio.run(portal()) == ["queued"] * 12
    assert len(keys) > 12 + 3 * 8  # more tries than attempts allow: each kept its key until a slot freed
    assert set(keys) == {f"visit-{n}" for n in range(12)}


def test_a_submission_gives_up_once_busy_for_has_passed_and_says_its_key() -> None:
    keys: list[str] = []
    policy = RetryPolicy(attempts=2, backoff=0.01, busy_for=0.0)
    server = httpx.MockTransport(busy_then_accepted(100, keys))
    with Client("http://dermq.test", "dq_key", transport=server, retry=policy) as dermq:
        with pytest.raises(RateLimited) as gave_up:
            dermq.submit(b"image bytes")
        assert len(keys) == 2 and keys[0] == keys[1]
        assert gave_up.value.idempotency_key == keys[0]  # made up by the client, and now the caller's
        keys.clear()
        server.handler = busy_then_accepted(0, keys)  # type: ignore[attr-defined]
        case = dermq.submit(b"image bytes", idempotency_key=gave_up.value.idempotency_key)
    assert case.id == CASE_ID and keys == [gave_up.value.idempotency_key]


@pytest.mark.parametrize("client_kind", ["blocking", "asyncio"])
def test_an_error_after_the_case_was_stored_carries_the_key(client_kind: str) -> None:
    """The POST was answered 202; the long poll that followed was refused (the key revoked meanwhile):
    the error raised says which key stored the case, for a colleague's key to submit it again with."""

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=case_json("queued"))
        return httpx.Response(401, json={"status": 401, "code": "invalid_api_key", "detail": "revoked"})

    transport = httpx.MockTransport(server)
    with pytest.raises(Unauthorized) as failed:
        if client_kind == "blocking":
            with Client("http://dermq.test", "dq_key", transport=transport) as dermq:
                dermq.submit(b"image bytes", idempotency_key="visit-7", wait=5)
        else:

            async def flow() -> None:
                async with AsyncClient("http://dermq.test", "dq_key", transport=transport) as dermq:
                    await dermq.submit(b"image bytes", idempotency_key="visit-7", wait=5)

            asyncio.run(flow())
    assert failed.value.idempotency_key == "visit-7"


@pytest.mark.parametrize("client_kind", ["blocking", "asyncio"])
def test_a_stored_submission_waits_out_an_outage_and_returns_its_case(client_kind: str) -> None:
    """The POST stored the case; the long polls that followed met a database blip (503 without
    Retry-After): the case exists, so submit returns it as last seen, as before, rather than raise
    once its retries are spent (a caller that submitted again would make a second case)."""
    polls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal polls
        if request.method == "POST":
            return httpx.Response(202, json=case_json("queued"))
        polls += 1
        return httpx.Response(503, json={"status": 503, "code": "database_busy", "detail": "busy"})

    policy = RetryPolicy(attempts=2, backoff=0.05)
    transport = httpx.MockTransport(server)
    if client_kind == "blocking":
        with Client("http://dermq.test", "dq_key", transport=transport, retry=policy) as dermq:
            case = dermq.submit(b"image bytes", wait=0.6)
    else:

        async def flow():  # type: ignore[no-untyped-def]
            async with AsyncClient("http://dermq.test", "dq_key", transport=transport, retry=policy) as dermq:
                return await dermq.submit(b"image bytes", wait=0.6)

        case = asyncio.run(flow())
    assert case.id == CASE_ID and case.status == "queued" and polls > 2


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_wait_says_an_api_it_never_reached_at_once_not_after_its_timeout() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.01)
    with Client(closed_port(), "dq_key", retry=policy) as dermq, pytest.raises(ConnectionFailed):
        dermq.wait(CASE_ID, timeout=600)  # a wrong address: WaitTimeout ten minutes later, cause unknown


def test_a_wait_that_runs_out_after_an_outage_keeps_the_last_polls_error() -> None:
    answered = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        answered += 1
        if answered == 1:
            return httpx.Response(200, json=case_json("running"))
        raise httpx.ConnectError("connection refused")

    policy = RetryPolicy(attempts=2, backoff=0.05)
    transport = httpx.MockTransport(server)
    with (
        Client("http://dermq.test", "dq_key", transport=transport, retry=policy) as dermq,
        pytest.raises(WaitTimeout) as ran_out,
    ):
        dermq.wait(CASE_ID, timeout=0.5)
    assert answered > 2  # past attempts: the case exists, so an outage is waited out until the timeout
    assert ran_out.value.case is not None and ran_out.value.case.status == "running"
    assert isinstance(ran_out.value.__cause__, ConnectionFailed)


def test_the_command_line_prints_the_key_it_made_up_when_it_gives_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DERMQ_API_KEY", "dq_test")
    image = tmp_path / "lesion.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    status = main(["--base-url", closed_port(), "--timeout", "1", "submit", str(image)])
    out, err = capsys.readouterr()
    problem = json.loads(err)
    assert status == 1 and out == "" and "could not reach the dermq API" in problem["detail"]
    assert len(problem["idempotency_key"]) == 36  # the random key its retries sent: submit with it again
    status = main(["--base-url", closed_port(), "submit", str(image), "--idempotency-key", "visit-9"])
    assert "idempotency_key" not in json.loads(capsys.readouterr().err)  # the caller's own: known already


def _silent(released: threading.Event) -> type[QuietHandler]:
    """An API (or a proxy in front of it) that takes a poll and answers nothing until ``released``."""

    class Silent(QuietHandler):
        def do_GET(self) -> None:
            released.wait(60)

    return Silent


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_wait_on_an_api_that_never_answers_gives_up_near_its_timeout(asynchronous: bool) -> None:
    """``wait(timeout=1)`` raised WaitTimeout after 31 s: each poll's read timeout was the client's
    (30 s) on top of the poll, whatever the caller's deadline. A portal page that waits a second for a
    result held its request half a minute. Now the last poll is read at most LATE_ANSWER past it."""
    policy = RetryPolicy(attempts=3)  # a poll's failure before any answer is retried while time is left
    released = threading.Event()
    try:
        with serving(_silent(released)) as base:
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                if asynchronous:

                    async def portal() -> None:
                        async with AsyncClient(base, "dq_key", retry=policy) as client:
                            await client.wait(CASE_ID, timeout=1.0)

                    asyncio.run(portal())
                else:
                    with Client(base, "dq_key", retry=policy) as client:
                        client.wait(CASE_ID, timeout=1.0)
            took = time.monotonic() - started
            released.set()
    finally:
        released.set()
    assert 1.0 + LATE_ANSWER - 1 < took < 1.0 + LATE_ANSWER + 2, took  # the poll was read, then given up
