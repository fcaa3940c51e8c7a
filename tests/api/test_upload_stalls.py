"""An upload that stalls or trickles is answered 408 and lets go of its clinic's upload slot.

Over real sockets, against a real API process whose limits are small enough to watch: one upload in
flight per clinic, 2 s without data, 3 s in all. Before the fix a stalled connection held its slot for
as long as it stayed open, and every other submission of that clinic got 429 meanwhile."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import processes, support

pytestmark = pytest.mark.usefixtures("database")

IDLE, TOTAL = 2.0, 3.0


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], stack_dir: Path, redis_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_METRICS_PORT": str(support.free_port()),
        "DERMQ_MAX_CONCURRENT_UPLOADS_PER_CLINIC": "1",
        "DERMQ_UPLOAD_IDLE_TIMEOUT_SECONDS": str(IDLE),
        "DERMQ_UPLOAD_TIMEOUT_SECONDS": str(TOTAL),
    }
    with processes.api_process(env, stack_dir / "stalls-api.log") as (base, _):
        yield base


def _start_upload(base: str, token: str, body: bytes, content_type: str, sent: int) -> socket.socket:
    """A connection that has sent the request's headers and the first ``sent`` bytes of ``body``."""
    port = int(base.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=15)
    head = (
        f"POST /v1/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode() + body[:sent])
    return connection


def _answer(connection: socket.socket) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the response on ``connection`` (read until the server closes it or
    the body is complete)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload[: _length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _corrupt_submission(base: str, token: str) -> int:
    """A complete submission whose image is not an image: 415 when it gets a slot (its bytes are no
    image format), 429 when it does not; either way nothing is stored."""
    body, content_type = support.multipart(b"not an image at all" * 10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    return httpx.post(f"{base}/v1/cases", headers=headers, content=body, timeout=10).status_code


def _answered(connection: socket.socket) -> bool:
    """Whether the server has answered (or closed) ``connection`` yet, without waiting."""
    readable, _, _ = select.select([connection], [], [], 0)
    return bool(readable)


def _stall_holding_the_slot(base: str, token: str, body: bytes, content_type: str) -> tuple[socket.socket, float]:
    """A stalled upload that holds the clinic's one slot (while it does, the clinic's other uploads are
    turned away with 429), and when it began. Should another upload take the slot first, the stalled
    one is turned away, and a new one tries again."""
    for _ in range(5):
        started = time.monotonic()
        stalled = _start_upload(base, token, body, content_type, sent=1000)
        while not _answered(stalled):
            if _corrupt_submission(base, token) == 429:
                return stalled, started
        stalled.close()
    raise AssertionError("no stalled upload ever held the slot")


def test_a_stalled_upload_is_answered_408_and_frees_its_clinics_slot(api: str, tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    body, content_type = support.multipart(jpeg_bytes, fields={"priority": "urgent"})
    stalled, started = _stall_holding_the_slot(api, tenant.token, body, content_type)
    with stalled:
        status, problem = _answer(stalled)
    assert (status, problem["code"]) == (408, "upload_stalled"), problem
    assert problem["status"] == 408 and problem["instance"] == "/v1/cases"
    assert IDLE <= time.monotonic() - started < IDLE + 5
    assert _corrupt_submission(api, tenant.token) == 415  # the slot is free again


@pytest.mark.parametrize("route", ["PUT /v1/clinic/callback", "POST /v1/admin/keys"])
def test_a_json_body_that_stalls_is_answered_408_before_any_key_is_checked(api: str, route: str) -> None:
    """FastAPI reads a JSON body before any dependency runs, the key's check included: a body that
    stalled held its connection for as long as the client liked, unaudited and unlimited."""
    method, path = route.split()
    port = int(api.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as stalled:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        stalled.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"url": ')
        status, problem = _answer(stalled)
    assert (status, problem["code"]) == (408, "request_timeout"), problem
    assert IDLE <= time.monotonic() - started < IDLE + 5


def test_an_upload_that_trickles_past_the_deadline_is_answered_408(api: str, tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    body, content_type = support.multipart(jpeg_bytes)
    started = time.monotonic()
    with _start_upload(api, tenant.token, body, content_type, sent=100) as trickle:
        trickle.settimeout(0.5)
        answer = b""
        for byte in body[100:]:  # a byte every half second: never idle for 2 s, never finished
            try:
                trickle.sendall(bytes([byte]))
                answer = trickle.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:  # the server answered and closed while a byte was on its way
                break
            if answer:
                break
        trickle.settimeout(15)
        status, problem = _answer(trickle)
    assert (status, problem["code"]) == (408, "upload_timeout"), problem
    assert TOTAL <= time.monotonic() - started < TOTAL + 5
    assert _corrupt_submission(api, tenant.token) == 415


def test_a_key_revoked_while_its_upload_arrives_stores_nothing(api: str, make_key, settings, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    """The key was checked when the request began; an upload may take minutes after that. A key revoked
    meanwhile used to create, queue and audit the case all the same."""
    from sqlalchemy import func, select

    from core import keys
    from core.db import session_scope
    from core.models import Case

    tenant = make_key()
    body, content_type = support.multipart(jpeg_bytes)
    half = len(body) // 2
    upload = _start_upload(api, tenant.token, body, content_type, half)
    try:
        # its clinic's one upload slot is taken: the request is past its authentication
        support.wait_for(lambda: _corrupt_submission(api, tenant.token) == 429, timeout=IDLE, what="the upload's slot")
        with session_scope(settings) as session:
            keys.revoke_key(session, tenant.key_id)
        support.wait_for(lambda: _corrupt_submission(api, tenant.token) == 401, timeout=IDLE, what="the revocation")
        upload.sendall(body[half:])
        status, problem = _answer(upload)
    finally:
        upload.close()
    assert (status, problem.get("code")) == (401, "revoked_credentials"), problem
    with session_scope(settings) as session:
        stored = session.scalar(select(func.count()).select_from(Case).where(Case.clinic_id == tenant.clinic_id))
    assert stored == 0
