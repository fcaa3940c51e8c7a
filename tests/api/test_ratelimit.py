"""Rate limits in Redis: per key for submissions and reads, per source address for failed logins."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.app import create_app
from api.auth_turns import Turns
from tests import support

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def strict(settings, redis_client):  # type: ignore[no-untyped-def]
    redis_client.delete(*redis_client.keys("dermq:rl:*") or ["none"])
    app = create_app(
        settings.model_copy(
            update={
                "rate_limit_submissions_per_minute": 3,
                "rate_limit_reads_per_minute": 5,
                "rate_limit_failed_auth_per_minute": 4,
            }
        )
    )
    with TestClient(app) as http:
        yield http
    redis_client.delete(*redis_client.keys("dermq:rl:*") or ["none"])


def test_reads_are_limited_per_key(strict, make_key) -> None:  # type: ignore[no-untyped-def]
    first, second = make_key(), make_key()
    codes = [strict.get("/v1/cases", headers=first.headers).status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
    refused = strict.get("/v1/cases", headers=first.headers)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["code"] == "rate_limited"
    assert strict.get("/v1/cases", headers=second.headers).status_code == 200  # another key is unaffected


def test_submissions_have_their_own_budget(strict, make_key, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    codes = [
        strict.post(
            "/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", jpeg_bytes, "image/jpeg")}
        ).status_code
        for _ in range(4)
    ]
    assert codes == [202, 202, 202, 429]
    assert strict.get("/v1/cases", headers=tenant.headers).status_code == 200  # reads still pass


def test_a_long_poll_counts_as_one_read_and_is_refused_before_it_waits(strict, make_key, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    files = {"image": ("x.jpg", jpeg_bytes, "image/jpeg")}
    case_id = strict.post("/v1/cases", headers=tenant.headers, files=files).json()["id"]
    assert [strict.get("/v1/cases", headers=tenant.headers).status_code for _ in range(4)] == [200] * 4
    assert strict.get(f"/v1/cases/{case_id}?wait=1", headers=tenant.headers).status_code == 200  # the fifth read
    started = time.monotonic()
    refused = strict.get(f"/v1/cases/{case_id}?wait=5", headers=tenant.headers)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert time.monotonic() - started < 2  # refused at once, not after its wait


def test_failed_authentication_is_limited_per_address_and_key_prefix(strict, make_key) -> None:  # type: ignore[no-untyped-def]
    bad = {"Authorization": "Bearer dq_000000000000_" + "B" * 43}
    codes = [strict.get("/v1/cases", headers=bad).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 401, 429]
    refused = strict.get("/v1/cases", headers=bad)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    # Garbage sprayed from one address (a clinic's NAT) never locks out the valid keys behind it.
    assert strict.get("/v1/cases", headers=make_key().headers).status_code == 200
    for i in range(12):
        garbage = {"Authorization": f"Bearer dq_{i:012x}_" + "C" * 43}
        strict.get("/v1/cases", headers=garbage)
    assert strict.get("/v1/cases", headers=make_key().headers).status_code == 200


def test_inventing_a_new_prefix_for_each_guess_is_limited_per_address(settings, strict, make_key) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.models import AuditEvent

    address = f"198.51.100.{uuid.uuid4().int % 200 + 20}"
    elsewhere = create_app(settings.model_copy(update={"rate_limit_failed_auth_per_minute": 4}))
    with TestClient(elsewhere, client=(address, 40000)) as http:
        codes = [
            http.get(
                "/v1/cases", headers={"Authorization": f"Bearer dq_{uuid.uuid4().hex[:12]}_" + "D" * 43}
            ).status_code
            for _ in range(8)
        ]
        assert codes == [401] * 4 + [429] * 4
        assert http.get("/v1/cases", headers=make_key().headers).status_code == 200  # real keys still pass
    with session_scope(settings) as session:  # each refused guess left no audit event: the trail stays bounded
        denied = session.scalar(
            select(func.count()).where(AuditEvent.action == "auth.denied", AuditEvent.source_ip == address)
        )
    assert denied == 4


def test_guesses_sent_at_once_are_checked_no_more_often_than_the_limit(strict, make_key) -> None:  # type: ignore[no-untyped-def]
    prefix = make_key().token.split("_")[1]
    guess = {"Authorization": f"Bearer dq_{prefix}_" + "H" * 43}
    assert strict.get("/v1/cases", headers=guess).status_code == 401  # this address has failed with this key
    start = threading.Barrier(12)

    def try_once(_: int) -> int:
        start.wait()
        return strict.get("/v1/cases", headers=guess).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(try_once, range(12)))
    assert codes.count(401) <= 3 and set(codes) <= {401, 429}, codes  # 4 a minute, one spent above


class CountedTurns(Turns):
    """The API's key-check turns (api.auth_turns), counting the requests that have asked for one."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    @contextlib.asynccontextmanager
    async def turn(self, name: str) -> AsyncIterator[None]:
        self.asked += 1  # on the event loop, like every turn
        async with super().turn(name):
            yield


def test_guesses_sent_at_once_into_a_quiet_bucket_are_checked_no_more_often_than_the_limit(  # type: ignore[no-untyped-def]
    strict, make_key, settings
) -> None:
    # With no failure yet, each guess of a burst passed the look at the limit before the first had
    # failed, and every one was checked (then again a minute later). The key table held locked keeps
    # the first check waiting while the burst arrives: the checks of a bucket take turns.
    prefix = make_key().token.split("_")[1]
    guess = {"Authorization": f"Bearer dq_{prefix}_" + "H" * 43}
    turns = strict.app.state.dermq.auth_turns = CountedTurns()
    engine = create_engine(settings.database_url)
    waiting = text("SELECT count(*) FROM pg_locks WHERE relation = 'api_keys'::regclass AND NOT granted")
    try:
        with ThreadPoolExecutor(12) as pool, engine.connect() as connection:
            connection.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            answers = [pool.submit(lambda: strict.get("/v1/cases", headers=guess).status_code) for _ in range(12)]
            # the whole burst has arrived before the first check may go on: one at the lock, the rest
            # waiting for their turn
            support.wait_for(
                lambda: turns.asked == 12 and connection.execute(waiting).scalar(),
                timeout=30,
                what="a check at the lock and the burst waiting for its turn",
            )
            connection.rollback()
            codes = sorted(answer.result() for answer in answers)
    finally:
        engine.dispose()
    assert codes.count(401) <= 4 and set(codes) <= {401, 429}, codes  # 4 a minute


def test_valid_logins_sent_at_once_are_never_refused_as_failures(settings, make_key) -> None:  # type: ignore[no-untyped-def]
    # no key cache: every request is checked in the database, as after any key change in the deployment
    tenant = make_key()
    app = create_app(settings.model_copy(update={"rate_limit_failed_auth_per_minute": 4, "key_cache_seconds": 0}))
    start = threading.Barrier(10)
    with TestClient(app, client=(f"198.51.100.{uuid.uuid4().int % 200 + 20}", 40000)) as http:

        def try_once(_: int) -> int:
            start.wait()
            return http.get("/v1/cases", headers=tenant.headers).status_code

        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(try_once, range(10)))
    assert codes == [200] * 10, codes


def test_a_limit_above_one_a_millisecond_is_kept(redis_client) -> None:  # type: ignore[no-untyped-def]
    from core.ratelimit import RateLimiter

    limiter = RateLimiter(redis_client, prefix=f"dermq:rl:test-{uuid.uuid4().hex}:")
    # 70,000 a minute: an interval of 0.86 ms, which whole milliseconds made 0 (no limit at all)
    assert limiter.hit("fast", 70_000, cost=70_000).allowed
    assert not limiter.hit("fast", 70_000, cost=1_000).allowed  # the next 1,000 need 0.86 s
    # 1,300 a minute: 46.15 ms, which whole milliseconds made 46 (1,304 a minute)
    assert limiter.hit("odd", 1_300, cost=1_300).allowed
    assert not limiter.hit("odd", 1_300, cost=4).allowed  # 185 ms away, not already there
    limiter.refund("odd", 1_300)
    redis_client.delete(*redis_client.keys(f"{limiter.prefix}*") or ["none"])


def test_failed_logins_with_another_scheme_are_limited_too(strict) -> None:  # type: ignore[no-untyped-def]
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    codes = [strict.get("/v1/cases", headers=basic).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 401, 429]
    refused = strict.get("/v1/cases", headers=basic)
    assert refused.json()["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1


def test_guesses_at_one_keys_secret_lock_that_key_out_from_that_address_only(  # type: ignore[no-untyped-def]
    settings, strict, make_key
) -> None:
    tenant = make_key()
    prefix = tenant.token.split("_")[1]
    guess = {"Authorization": f"Bearer dq_{prefix}_" + "G" * 43}
    assert [strict.get("/v1/cases", headers=guess).status_code for _ in range(5)] == [401] * 4 + [429]
    assert strict.get("/v1/cases", headers=tenant.headers).status_code == 429  # from the guessing address
    elsewhere = create_app(settings.model_copy(update={"rate_limit_failed_auth_per_minute": 4}))
    with TestClient(elsewhere, client=("198.51.100.7", 40000)) as other:
        assert other.get("/v1/cases", headers=tenant.headers).status_code == 200


def test_guesses_from_one_ipv6_host_count_together_whatever_address_of_its_64_they_use(settings) -> None:  # type: ignore[no-untyped-def]
    """A host is given a whole /64: rotating through it gave every guess a fresh budget."""
    network = f"2001:db8:{uuid.uuid4().int % 0xFFFF:x}:1"
    elsewhere = create_app(settings.model_copy(update={"rate_limit_failed_auth_per_minute": 4}))
    codes = []
    for host in range(1, 9):
        with TestClient(elsewhere, client=(f"{network}::{host:x}", 40000)) as http:
            guess = {"Authorization": f"Bearer dq_{uuid.uuid4().hex[:12]}_" + "D" * 43}
            codes.append(http.get("/v1/cases", headers=guess).status_code)
    assert codes == [401] * 4 + [429] * 4
    with TestClient(elsewhere, client=(f"{network[:-1]}2::1", 40000)) as neighbour:  # the next /64: its own budget
        guess = {"Authorization": f"Bearer dq_{uuid.uuid4().hex[:12]}_" + "D" * 43}
        assert neighbour.get("/v1/cases", headers=guess).status_code == 401


def test_a_forwarded_address_is_believed_from_the_configured_proxy_only(settings, make_key, redis_client) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import AuditEvent

    app = create_app(settings.model_copy(update={"forwarded_allow_ips": ["10.20.30.40"]}))
    tenant = make_key()
    spoofed = {**tenant.headers, "X-Forwarded-For": "192.0.2.99"}
    direct_id, proxy_id = uuid.uuid4().hex, uuid.uuid4().hex  # request ids the audit events can be found by
    with TestClient(app, client=("203.0.113.5", 1234)) as direct:
        direct_status = direct.get("/v1/cases", headers={**spoofed, "X-Request-ID": direct_id}).status_code
    with TestClient(app, client=("10.20.30.40", 1234)) as via_proxy:
        proxied = via_proxy.get("/v1/cases", headers={**spoofed, "X-Request-ID": proxy_id}).status_code
    assert direct_status == proxied == 200
    with session_scope(settings) as session:
        seen = dict(
            session.execute(
                select(AuditEvent.request_id, AuditEvent.source_ip).where(
                    AuditEvent.request_id.in_([direct_id, proxy_id])
                )
            ).all()
        )
    assert seen == {direct_id: "203.0.113.5", proxy_id: "192.0.2.99"}


def test_failed_logins_stay_limited_while_redis_is_down() -> None:
    import redis

    from core.ratelimit import RateLimiter

    # a client as the API builds one (api/app.py), on a port where nothing listens
    limiter = RateLimiter(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1, socket_timeout=2))
    bucket = "authfail:198.51.100.1:-"
    assert [limiter.hit(bucket, 3, failures=True).allowed for _ in range(4)] == [True, True, True, False]
    assert not limiter.check(bucket, 3, failures=True).allowed
    limiter.refund(bucket, 3, failures=True)  # a reservation given back (the key turned out valid)
    assert limiter.check(bucket, 3, failures=True).allowed
    # request limits still let clinics through during the outage
    assert all(limiter.hit("read:some-key", 3).allowed for _ in range(5))


def test_refusals_for_a_keys_role_are_limited_and_each_audited_one_counted(strict, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    # the role is judged before any limit: a key looping on a route its role cannot use wrote an
    # audit event a request, for good, into a table nobody may delete from
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.models import AuditEvent

    clinic = make_key()
    codes = [strict.get("/v1/audit-events", headers=clinic.headers).status_code for _ in range(8)]
    assert codes == [403] * 5 + [429] * 3
    refused = strict.get("/v1/audit-events", headers=clinic.headers)
    assert refused.json()["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1
    with session_scope(settings) as session:
        denied = session.scalar(
            select(func.count()).where(AuditEvent.action == "access.denied", AuditEvent.actor_key_id == clinic.key_id)
        )
    assert denied == 5
    assert strict.get("/v1/cases", headers=clinic.headers).status_code == 200  # its own reads are its own
