"""Memory attacks on the intake, against a real API process: small files that decode to large
canvases, sent many at once, and one clinic holding many uploads open. The process's peak resident
memory stays bounded and every answer is a 202 or a 429 problem, never a 5xx or a killed process."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPMessage, HTTPResponse
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from core.ratelimit import RateLimiter
from tests import processes, support

BUDGET_MIB = 256


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of process ``pid`` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@pytest.fixture
def bounded_api(
    stack_env: dict[str, str], stack_dir: Path, database, redis_client
) -> Iterator[tuple[str, processes.Process]]:  # type: ignore[no-untyped-def]
    """An API process with a 256 MiB decode budget and at most 4 uploads in flight per clinic."""
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(port),
        "DERMQ_DECODE_MEMORY_BYTES": str(BUDGET_MIB * 1024 * 1024),
        "DERMQ_MAX_CONCURRENT_UPLOADS_PER_CLINIC": "4",
    }
    with processes.api_process(env, stack_dir / "bounded-api.log") as started:
        yield started


def lossless_bomb() -> bytes:
    """A PNG of about 70 KB that decodes to 4500x4500 RGB (20 megapixels, under the lossless cap)."""
    out = io.BytesIO()
    Image.new("RGB", (4500, 4500), (150, 100, 80)).save(out, "PNG")
    return out.getvalue()


def test_sixteen_lossless_bombs_at_once_keep_the_api_within_its_decode_budget(bounded_api, make_key) -> None:  # type: ignore[no-untyped-def]
    base, server = bounded_api
    bomb = lossless_bomb()
    assert len(bomb) < 200_000
    tenants = [make_key("clinic") for _ in range(4)]
    with httpx.Client(base_url=base, timeout=60) as http:
        http.get("/healthz")
        before, _ = peak_rss_mib(server.proc.pid)

        def submit(i: int) -> httpx.Response:
            files = {"image": ("bomb.png", bomb, "image/png")}
            return http.post("/v1/cases", files=files, headers=tenants[i % 4].headers)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(submit, range(16)))
    _, peak = peak_rss_mib(server.proc.pid)

    assert server.alive()
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {202, 429}, statuses
    assert 202 in statuses
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["Retry-After"]) >= 1
    # Sixteen concurrent full decodes would hold about a gigabyte (60 MB of pixels each, plus copies);
    # measured without these bounds, the process grew by 1.3 GiB.
    assert peak - before < BUDGET_MIB, f"peak RSS grew by {peak - before:.0f} MiB"


def _start_upload(base: str, tenant, body: bytes, content_type: str) -> socket.socket:  # type: ignore[no-untyped-def]
    """An upload whose headers and first bytes are sent, the rest held back."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tenant.token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:100])
    return sock


def _status_if_answered(sock: socket.socket) -> int | None:
    """The status line's code if the server has answered already (without the whole body sent)."""
    sock.settimeout(0.05)
    try:
        data = sock.recv(64, socket.MSG_PEEK)
    except TimeoutError:
        return None
    finally:
        sock.settimeout(30)
    return int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1 ") else None


def _answer(sock: socket.socket) -> tuple[int, HTTPMessage, bytes]:
    """The whole answer on ``sock`` (status, headers, body), however many segments it came in."""
    answer = HTTPResponse(sock)
    answer.begin()
    return answer.status, answer.headers, answer.read()


def _finish(sock: socket.socket, body: bytes) -> int:
    sock.sendall(body[100:])
    return _answer(sock)[0]


def test_one_clinic_cannot_hold_more_than_its_share_of_uploads_open(
    bounded_api, stack_env, make_key, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    base, _ = bounded_api
    greedy, other = make_key("clinic"), make_key("clinic")
    body, content_type = support.multipart(jpeg_bytes)
    uploads = [_start_upload(base, greedy, body, content_type) for _ in range(5)]
    try:
        # Four hold their slots, their bodies unfinished; the one that came fifth is refused at once,
        # before its body is read.
        answered = support.wait_for(
            lambda: [s for s in uploads if _status_if_answered(s) is not None] or None,
            timeout=30,
            what="the fifth upload of one clinic to be refused",
        )
        assert len(answered) == 1 and _status_if_answered(answered[0]) == 429
        status, headers, problem = _answer(answered[0])
        assert status == 429 and headers["content-type"] == "application/problem+json"
        assert "uploads in progress" in json.loads(problem)["detail"] and int(headers["retry-after"]) >= 1
        with httpx.Client(base_url=base, timeout=30) as http:
            files = {"image": ("a.jpg", jpeg_bytes, "image/jpeg")}
            # A portal queueing behind its own uploads is refused without spending its key's
            # submissions (its retries once a second used them up, and then every user of the key
            # was refused `rate_limited`).
            counted = f"{RateLimiter.PREFIX}submit:{greedy.key_id}"
            with redis.Redis.from_url(stack_env["DERMQ_REDIS_URL"]) as broker:
                spent = broker.get(counted)
                refused = [http.post("/v1/cases", files=files, headers=greedy.headers) for _ in range(3)]
                assert [r.status_code for r in refused] == [429] * 3
                assert all("uploads in progress" in r.json()["detail"] for r in refused)
                assert broker.get(counted) == spent
            # Another clinic is not held back by it.
            assert http.post("/v1/cases", files=files, headers=other.headers).status_code == 202
        assert [_finish(s, body) for s in uploads if s is not answered[0]] == [202] * 4
    finally:
        for sock in uploads:
            sock.close()


def test_an_unfinished_upload_holds_no_database_connection(
    stack_env, stack_dir, database, make_key, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """Its key checked in the database (no key cache here), an upload whose body has not all come
    holds no pooled connection meanwhile: with a pool of one, another clinic's requests are served."""
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_KEY_CACHE_SECONDS": "0",
        "DERMQ_DATABASE_POOL_SIZE": "1",
        "DERMQ_DATABASE_POOL_TIMEOUT_S": "2",
    }
    slow, other = make_key("clinic"), make_key("clinic")
    body, content_type = support.multipart(jpeg_bytes)
    with processes.api_process(env, stack_dir / "one-connection-api.log") as (base, _):
        upload = _start_upload(base, slow, body, content_type)
        try:
            # authenticated, then counted against its key's limit: now it waits for the rest of its body
            counted = f"{RateLimiter.PREFIX}submit:{slow.key_id}"
            with redis.Redis.from_url(env["DERMQ_REDIS_URL"]) as broker:
                support.wait_for(lambda: broker.exists(counted), timeout=20, what="the upload to be authenticated")
            with httpx.Client(base_url=base, timeout=30) as http:
                for _ in range(2):
                    listed = http.get("/v1/cases", headers=other.headers)
                    assert listed.status_code == 200, listed.text
            assert _finish(upload, body) == 202
        finally:
            upload.close()
