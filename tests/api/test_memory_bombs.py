"""Memory attacks on the intake, against a real API process: small files that decode to large
canvases, sent many at once, and one clinic holding many uploads open. The process's peak resident
memory stays bounded and every answer is a 202 or a 429 problem, never a 5xx or a killed process."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests import support

BUDGET_MIB = 256


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of process ``pid`` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@pytest.fixture
def bounded_api(
    stack_env: dict[str, str], stack_dir: Path, database, redis_client
) -> Iterator[tuple[str, support.Process]]:  # type: ignore[no-untyped-def]
    """An API process with a 256 MiB decode budget and at most 4 uploads in flight per clinic."""
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(port),
        "DERMQ_DECODE_MEMORY_BYTES": str(BUDGET_MIB * 1024 * 1024),
        "DERMQ_MAX_CONCURRENT_UPLOADS_PER_CLINIC": "4",
    }
    server = support.Process("api", [str(support.VENV_BIN / "dermq-api")], env, stack_dir / "bounded-api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_for(lambda: support.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        assert server.alive(), server.output()[-3000:]
        yield base, server
    finally:
        server.stop()


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


def test_one_clinic_cannot_hold_more_than_its_share_of_uploads_open(bounded_api, make_key, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    base, _ = bounded_api
    greedy, other = make_key("clinic"), make_key("clinic")
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow_body() -> Iterator[bytes]:
        body, _ = support.multipart(jpeg_bytes)
        yield body[:100]
        started.release()
        release.wait(30)
        yield body[100:]

    _, content_type = support.multipart(jpeg_bytes)

    def slow_submit() -> int:
        headers = {**greedy.headers, "Content-Type": content_type}
        with httpx.Client(base_url=base, timeout=60) as http:
            return http.post("/v1/cases", content=slow_body(), headers=headers).status_code

    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(slow_submit) for _ in range(4)]
        for _ in range(4):
            assert started.acquire(timeout=30)
        try:
            with httpx.Client(base_url=base, timeout=30) as http:
                support.wait_for(
                    lambda: (
                        http.post(
                            "/v1/cases", files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}, headers=greedy.headers
                        ).status_code
                        == 429
                    ),
                    timeout=30,
                    what="the fifth upload of one clinic to be refused",
                )
                refused = http.post(
                    "/v1/cases", files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}, headers=greedy.headers
                )
                assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
                assert "uploads in progress" in refused.json()["detail"]
                accepted = http.post(
                    "/v1/cases", files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}, headers=other.headers
                )
                assert accepted.status_code == 202
        finally:
            release.set()
        assert [f.result() for f in slow] == [202] * 4
