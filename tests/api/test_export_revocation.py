"""Revoking an auditor's key while its export streams: the export stops at the next page, the client
sees a broken download rather than a file that looks complete, and the stop is audited.

The API runs in its own process (uvicorn, real sockets) on a database of this module's own, which
holds tens of thousands of events: far more than the loopback connection's buffers, so most of the
export is still unsent when the key is revoked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core import audit, keys
from core.db import session_scope
from core.models import AuditEvent
from tests import processes, support
from tests.conftest import Tenant, new_tenant

#: 60 pages of the export's 1000 events, about 25 MB of NDJSON
EVENTS = 60_000


@pytest.fixture(scope="module")
def export_api(own_database, stack_env: dict[str, str], stack_dir: Path, keyring) -> Iterator[tuple[str, Any]]:  # type: ignore[no-untyped-def]
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": own_database.database_url,
        "DERMQ_API_PORT": str(port),
        "DERMQ_API_PROCESSES": "1",
    }
    with processes.api_process(env, stack_dir / "export-api.log") as (base, _):
        yield base, own_database


def test_revoking_a_key_while_its_export_streams_cuts_the_export_short(export_api, keyring) -> None:  # type: ignore[no-untyped-def]
    base, settings = export_api
    auditor: Tenant = new_tenant(settings, keyring, "auditor")
    clinic: Tenant = new_tenant(settings, keyring, "clinic")
    with session_scope(settings) as session:
        audit.record_many(
            session,
            [
                audit.Event("case.read", audit.SUCCESS, audit.SYSTEM, "case", uuid.uuid4(), clinic.clinic_id, None)
                for _ in range(EVENTS)
            ],
        )
    now = datetime.now(UTC)
    params = {
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(minutes=5)).isoformat(),
        "clinic": str(clinic.clinic_id),
    }
    received = b""
    with httpx.stream(
        "GET", f"{base}/v1/audit-events/export", params=params, headers=auditor.headers, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()[:500]
        chunks = response.iter_raw()
        received += next(chunks)
        with session_scope(settings) as session:
            keys.revoke_key(session, auditor.key_id)
        with pytest.raises(httpx.RemoteProtocolError):  # the body ends before the chunked encoding does
            for chunk in chunks:
                received += chunk
    lines = received.count(b"\n")
    assert 0 < lines < EVENTS, lines

    with session_scope(settings) as session:
        stopped = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "audit.export",
                AuditEvent.outcome == audit.DENIED,
                AuditEvent.actor_key_id == auditor.key_id,
            )
        ).all()
    assert [(e.detail or {}).get("reason") for e in stopped] == ["revoked_credentials"]

    # and the revoked key gets nothing more
    again = httpx.get(f"{base}/v1/audit-events/export", params=params, headers=auditor.headers, timeout=30)
    assert again.status_code == 401 and again.json()["code"] == "revoked_credentials"
