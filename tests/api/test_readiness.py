"""``/readyz`` answers within the orchestrator's probe timeout (3 s in deploy/k8s), whatever the
database does: a process whose every connection is in use is busy and stays ready; a database that
does not answer makes it not ready, in time for the probe to see it."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routes.health import NO_ANSWER, READINESS_BOUND_S
from core.db import get_engine

pytestmark = pytest.mark.usefixtures("database")
PROBE_TIMEOUT_S = 3.0  # deploy/k8s/api.yaml's readinessProbe


def test_a_full_pool_that_gives_connections_back_is_busy_and_one_that_gives_none_back_is_not_ready(  # type: ignore[no-untyped-def]
    settings,
) -> None:
    # one connection, and a request that finds it taken would wait 30 s for it
    busy = settings.model_copy(update={"database_pool_size": 1, "database_pool_timeout_s": 30.0})
    engine = get_engine(busy)
    try:
        with TestClient(create_app(busy), raise_server_exceptions=False) as api:
            engine.connect().close()  # a request served a moment ago
            held = engine.connect()  # and the next one, slow to finish
            try:
                started = time.monotonic()
                during = api.get("/readyz")
                took = time.monotonic() - started
                time.sleep(READINESS_BOUND_S)  # nothing given back since: requests wait on the database
                stuck = api.get("/readyz")
            finally:
                held.close()
            after = api.get("/readyz")
    finally:
        engine.dispose()
    assert during.status_code == 200, during.text
    assert during.json() == {"status": "ready", "checks": {"postgres": "busy", "redis": "ok"}}
    assert took < PROBE_TIMEOUT_S  # not the pool's 30 s
    assert stuck.status_code == 503 and stuck.json()["checks"] == {"postgres": NO_ANSWER, "redis": "ok"}
    assert after.status_code == 200 and after.json()["checks"] == {"postgres": "ok", "redis": "ok"}


def test_a_database_that_accepts_the_connection_and_never_answers_makes_the_process_not_ready_in_time(  # type: ignore[no-untyped-def]
    settings,
) -> None:
    with socket.socket() as silent:  # listens, and never says a word (a host behind a dead link)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        unanswered = settings.model_copy(update={"database_url": f"postgresql+psycopg2://dermq@127.0.0.1:{port}/dermq"})
        try:
            with TestClient(create_app(unanswered), raise_server_exceptions=False) as api:
                started = time.monotonic()
                ready = api.get("/readyz")
                took = time.monotonic() - started
        finally:
            get_engine(unanswered).dispose()
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    assert ready.json() == {"status": "not_ready", "checks": {"postgres": NO_ANSWER, "redis": "ok"}}
    assert READINESS_BOUND_S <= took < PROBE_TIMEOUT_S  # not libpq's 5 s connect timeout


def test_health_and_readiness_answer_head_requests_without_a_body(live_api: str) -> None:
    # uptime checkers and load balancers often probe with HEAD; read off the socket, since an HTTP
    # client never reads a body after a HEAD
    host, port = urlsplit(live_api).hostname, urlsplit(live_api).port
    for path in ("/healthz", "/readyz"):
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(f"HEAD {path} HTTP/1.1\r\nHost: dermq\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), (path, head)
        assert b"content-type: application/json" in head.lower() and body == b"", (path, answer)


def test_probes_that_come_at_once_all_get_the_answer(live_api: str) -> None:
    # a kubelet, a load balancer and an uptime checker probe independently: a probe that comes while
    # another's check runs shares its answer (each started a check of its own, and a third found no
    # thread left for it: "unreachable")
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{live_api}/readyz", timeout=10), range(24)))
    assert [a.status_code for a in answers] == [200] * 24, [a.text for a in answers if a.status_code != 200]
