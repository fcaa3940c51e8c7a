"""The upload bodies one API process holds at once are bounded whichever clinics send them.

The per-clinic upload slots alone let many clinics' slow large uploads hold their bodies in memory
together (ten 25 MiB uploads over slow links: over a gigabyte per process, and the pod's memory
limit killed every upload and long poll in it). Over real sockets against a real API process whose
budget holds one large body and not two."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.intake_limits import UploadSlots
from core.errors import RateLimited
from tests import processes, support
from tests.api.test_upload_stalls import _answered, _start_upload

pytestmark = pytest.mark.usefixtures("database")

MAX_UPLOAD = 256 * 1024
BUDGET = MAX_UPLOAD + 80 * 1024  # one upload of the largest size and its form; not two of 200 KB


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], stack_dir: Path, redis_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_METRICS_PORT": str(support.free_port()),
        "DERMQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "DERMQ_UPLOAD_MEMORY_BYTES": str(BUDGET),
        "DERMQ_UPLOAD_IDLE_TIMEOUT_SECONDS": "30",
    }
    with processes.api_process(env, stack_dir / "upload-memory-api.log") as (base, _):
        yield base


def _submit(base: str, token: str, size: int) -> httpx.Response:
    """A complete submission of ``size`` bytes that are no image: 415 once admitted."""
    body, content_type = support.multipart(b"x" * size)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    return httpx.post(f"{base}/v1/cases", headers=headers, content=body, timeout=10)


def _start_chunked(base: str, token: str, body: bytes, content_type: str) -> socket.socket:
    """A connection that sent ``body`` as one chunk of a chunked request, and then nothing more."""
    port = int(base.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=15)
    head = (
        f"POST /v1/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    connection.sendall(head.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n")
    return connection


@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_another_clinics_upload_waits_while_one_large_body_fills_the_budget(  # type: ignore[no-untyped-def]
    api: str, make_key, framing: str
) -> None:
    """What has arrived counts, with a Content-Length or without; a declared length that does not fit
    beside it is refused before a byte of its body is read."""
    first, second = make_key("clinic"), make_key("clinic")
    body, content_type = support.multipart(b"\xff\xd8\xff" + b"x" * 200_000)
    if framing == "declared":
        held = _start_upload(api, first.token, body, content_type, sent=len(body) - 100)  # all but the end
    else:
        held = _start_chunked(api, first.token, body[: len(body) - 100], content_type)
    try:
        deadline = time.monotonic() + 10
        refused = _submit(api, second.token, 200_000)
        while refused.status_code != 429 and time.monotonic() < deadline:  # the first one's bytes arrived yet?
            refused = _submit(api, second.token, 200_000)
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        assert "large uploads" in refused.json()["detail"]
        assert _submit(api, second.token, 20_000).status_code == 415  # a small one fits beside it
        # one over the size limit is told so, not to come back later (as it would, for ever)
        too_large = _submit(api, second.token, MAX_UPLOAD + 66 * 1024)
        assert (too_large.status_code, too_large.json()["code"]) == (413, "payload_too_large")
        assert not _answered(held)
    finally:
        held.close()  # the client gives up: its body's bytes are given back
    deadline = time.monotonic() + 10
    while (status := _submit(api, second.token, 200_000).status_code) == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 415


def test_an_upload_that_declared_much_and_sent_little_holds_only_what_it_sent(api: str, make_key) -> None:  # type: ignore[no-untyped-def]
    """Reserving a declared length before its body came let a few clinics' idle connections (each
    declaring the largest upload) shut every other clinic's large uploads out."""
    first, second = make_key("clinic"), make_key("clinic")
    body, content_type = support.multipart(b"\xff\xd8\xff" + b"x" * 250_000)
    idle = _start_upload(api, first.token, body, content_type, sent=1000)  # declares 250 KB, sends 1 KB
    with idle:
        assert _submit(api, second.token, 200_000).status_code == 415  # admitted, read and refused as no image
        assert not _answered(idle)


def test_the_budget_is_shared_and_each_uploads_share_comes_back_with_its_slot() -> None:
    slots = UploadSlots(per_clinic=4, body_bytes=1000)
    with slots.hold(None) as first:
        first.reserve(600)
        with slots.hold(None) as second:
            second.reserve(400)
            with pytest.raises(RateLimited):
                second.reserve(1)
            assert slots.body_held() == 1000
        assert slots.body_held() == 600  # the second upload's bytes came back with its slot
    assert slots.body_held() == 0
