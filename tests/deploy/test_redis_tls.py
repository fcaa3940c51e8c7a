"""dermq over TLS to Redis, as docs/SECURITY.md ("Redis") and deploy/README.md ("Redis TLS") tell
operators to run it where the path to Redis leaves a private network: a redis-server of this
module's own that speaks TLS only (a certificate for 127.0.0.1 that a CA of the test's own signed),
and every process that talks to Redis given the documented URL form,
``rediss://:<password>@<host>:<port>/0?ssl_cert_reqs=required&ssl_ca_certs=<the CA file>``."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kombu.exceptions import OperationalError

from core.publisher import make_publisher
from core.ratelimit import RateLimiter
from tests import processes, support
from tests.conftest import Tenant, case_store, new_tenant
from tests.faults.servers import RedisServer, own_redis
from tests.worker.test_flower import check_flower_shows_the_queues


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    with own_redis("dermq-redis-tls-", password=secrets.token_urlsafe(12), tls=True) as server:
        yield server


def ended(base: str, tenant: Tenant, case_id: object) -> dict[str, object]:
    """The case once it has ended, read with long polls (``?wait=``, at most 30 s each)."""
    for _ in range(4):
        answer = httpx.get(f"{base}/v1/cases/{case_id}?wait=30", headers=tenant.headers, timeout=60)
        assert answer.status_code == 200, answer.text
        case: dict[str, object] = answer.json()
        if case["status"] not in ("queued", "running"):
            return case
    raise AssertionError(f"case {case_id} still {case['status']} after two minutes")


def test_a_plain_connection_fails_at_once_and_without_the_ca_no_client_trusts_the_server(  # type: ignore[no-untyped-def]
    tls_redis: RedisServer, settings
) -> None:
    plain = redis.Redis.from_url(tls_redis.url_with(tls_redis.password, scheme="redis"), socket_timeout=5)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    assert time.monotonic() - started < 2, "a plain redis:// URL to a TLS port must fail, not hang"
    # without ssl_ca_certs the server's certificate (of a CA of the test's own) is not trusted: by
    # redis-py (the API, the sweeper), nor by the workers' and beat's broker connection, where kombu,
    # given a rediss:// URL without TLS parameters, checked no certificate and connected
    bare = tls_redis.url.partition("?")[0]
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(bare, socket_timeout=5).ping()
    publisher = make_publisher(settings.model_copy(update={"redis_url": bare}))
    with publisher.connection_for_write() as connection, pytest.raises(OperationalError, match="CERTIFICATE_VERIFY"):
        connection.ensure_connection(max_retries=1, interval_start=0)


def test_the_stack_classifies_a_case_over_tls_to_redis(  # type: ignore[no-untyped-def]
    tls_redis: RedisServer, own_database, keyring, stack_env: dict[str, str], tmp_path: Path, jpeg_bytes: bytes
) -> None:
    """The API (rate limits, readiness, publishing), a classification worker (its broker connection,
    the control API the test pings it through), beat (publishing the sweep) and the sweeper's look
    at the broker's lists, all on the one TLS Redis: a submitted case is classified and its result
    read with ``?wait=``; a queued case whose message was lost is found by the sweep and classified."""
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": own_database.database_url,
        "DERMQ_REDIS_URL": tls_redis.url,
        "DERMQ_PERIOD_KEY_DIR": str(own_database.period_key_folder),
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_WORKER_METRICS_PORT": "0",
        "DERMQ_REQUEUE_GRACE_SECONDS": "1",
        "DERMQ_SWEEP_INTERVAL_SECONDS": "1",
    }
    redis.Redis.from_url(tls_redis.url).flushdb()
    tenant: Tenant = new_tenant(own_database, keyring)
    worker = processes.start_worker(env, tmp_path / "worker.log", name="tls")
    beat: processes.Process | None = None
    try:
        with processes.api_process(env, tmp_path / "api.log") as (base, _):
            ready = httpx.get(f"{base}/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
            image = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
            submitted = httpx.post(f"{base}/v1/cases", headers=tenant.headers, files=image, timeout=30)
            assert submitted.status_code == 202, submitted.text
            case_id = submitted.json()["id"]
            assert ended(base, tenant, case_id)["status"] == "succeeded"
            # the API counted the requests in this Redis (without it, limits let requests through)
            assert redis.Redis.from_url(tls_redis.url).keys(f"{RateLimiter.PREFIX}*")

            lost = case_store(own_database, keyring)(tenant, jpeg_bytes)  # queued, and no message sent
            beat = processes.Process(
                "beat",
                [
                    str(support.VENV_BIN / "celery"),
                    "-A",
                    "worker.celery_app",
                    "beat",
                    "--schedule",
                    str(tmp_path / "s"),
                ],
                env,
                tmp_path / "beat.log",
            )
            assert ended(base, tenant, lost)["status"] == "succeeded", beat.output()[-2000:]
    finally:
        if beat is not None:
            beat.stop()
        worker.stop()


def test_flower_and_the_callback_worker_reach_a_tls_redis(  # type: ignore[no-untyped-def]
    tls_redis: RedisServer, stack_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**stack_env, "DERMQ_REDIS_URL": tls_redis.url, "DERMQ_WORKER_METRICS_PORT": "0"}
    callbacks = processes.start_worker(
        env, tmp_path / "callbacks.log", name="tls-callbacks", app="worker.callbacks_app", queues="callbacks"
    )
    callbacks.stop()  # it answered a ping over TLS: its broker connection works
    check_flower_shows_the_queues(env, tls_redis.url, tmp_path / "flower.log")
