"""Rate limits in Redis: per key for submissions and reads, per source address for failed logins."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app

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


def test_failed_authentication_is_limited_per_address(strict, make_key) -> None:  # type: ignore[no-untyped-def]
    bad = {"Authorization": "Bearer dq_000000000000_" + "B" * 43}
    codes = [strict.get("/v1/cases", headers=bad).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 401, 429]
    # The address is blocked even for a valid key until the window passes: guessing stops.
    blocked = strict.get("/v1/cases", headers=make_key().headers)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
