"""Uploads sent at once by one clinic, over real sockets against a real API process: those turned away
because the clinic's uploads in flight are all taken do not count against the key's submissions
(docs/API.md), however many arrive together."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import processes, support

pytestmark = pytest.mark.usefixtures("database")

SUBMISSIONS_PER_MINUTE = 6
BURST = 8


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], stack_dir: Path, redis_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_MAX_CONCURRENT_UPLOADS_PER_CLINIC": "1",
        "DERMQ_RATE_LIMIT_SUBMISSIONS_PER_MINUTE": str(SUBMISSIONS_PER_MINUTE),
    }
    with processes.api_process(env, stack_dir / "slot-burst-api.log") as (base, _):
        yield base


def _answer(connection: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    while True:
        head, sep, payload = data.partition(b"\r\n\r\n")
        if sep and len(payload) >= _length(head):
            break
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload[: _length(head)])


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _not_an_image(base: str, token: str) -> httpx.Response:
    body, content_type = support.multipart(b"not an image at all" * 10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    return httpx.post(f"{base}/v1/cases", headers=headers, content=body, timeout=20)


def test_uploads_refused_for_a_full_clinic_in_a_burst_are_not_charged(api: str, make_key, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    assert _not_an_image(api, tenant.token).status_code == 415  # the key is in the cache: the burst is not in line
    body, content_type = support.multipart(jpeg_bytes)
    port = int(api.rsplit(":", 1)[1])
    head = (
        f"POST /v1/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tenant.token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    # every upload's headers and the start of its body go out before any is answered; none finishes
    uploads = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(BURST)]
    try:
        for upload in uploads:
            upload.sendall(head + body[:100])
        answers = []
        waiting = list(uploads)
        while len(answers) < BURST - 1:  # one of them holds the slot: it is not answered
            readable, _, _ = select.select(waiting, [], [], 15)
            assert readable, answers
            for upload in readable:
                waiting.remove(upload)
                answers.append(_answer(upload))
    finally:
        for upload in uploads:
            upload.close()
    refused = [problem["detail"] for status, problem in answers if status == 429]
    assert len(refused) >= BURST - 2, answers
    assert all("uploads in progress" in str(detail) for detail in refused), refused
    # the slot is free again once the held upload's client has gone. The key has spent three
    # submissions of its minute: the first above, the upload let in, and the one that finds the slot free
    support.wait_for(
        lambda: _not_an_image(api, tenant.token).status_code == 415, timeout=20, what="the slot to be given back"
    )
    left = [_not_an_image(api, tenant.token).status_code for _ in range(SUBMISSIONS_PER_MINUTE - 3)]
    assert left == [415] * (SUBMISSIONS_PER_MINUTE - 3)
