"""When every database connection of an API process is in use for longer than the pool's timeout,
the request is refused with a retryable 503, not a 500 (core.db keeps a fixed pool, no overflow)."""

from __future__ import annotations

import pytest

from core.db import get_engine
from tests.api.test_audit_api import submit

pytestmark = pytest.mark.usefixtures("database")


def test_a_request_that_gets_no_database_connection_in_time_is_told_to_retry(  # type: ignore[no-untyped-def]
    settings, make_key, jpeg_bytes: bytes, client
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_key()
    case_id = submit(client, tenant, jpeg_bytes)
    busy = settings.model_copy(update={"database_pool_size": 1, "database_pool_timeout_s": 0.3})
    engine = get_engine(busy)  # the API process's engine for these settings: one connection
    try:
        with TestClient(create_app(busy), raise_server_exceptions=False) as api:
            held = engine.connect()  # taken by another request that is slow to finish
            try:
                refused = api.get(f"/v1/cases/{case_id}", headers=tenant.headers)
            finally:
                held.close()
            served = api.get(f"/v1/cases/{case_id}", headers=tenant.headers)
    finally:
        engine.dispose()
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "database_busy" and refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "created_at" not in refused.text  # no case data
    assert served.status_code == 200 and served.json()["id"] == case_id
