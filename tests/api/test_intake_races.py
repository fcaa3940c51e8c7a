"""A submission in flight while its clinic is deactivated, or its key revoked: once the change has
committed, nothing of it is stored. The key was checked when the request began (or remembered by the
API) and the case's INSERT came later: a deactivation or revocation committed in between let the case
in after it, and queued it. The intake is held at its INSERT, here, by a row lock the test takes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core import clinics, credential_locks, keys
from core.db import session_scope
from core.models import AuditEvent, Case
from tests import support
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def _stored(settings, tenant: Tenant) -> int:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Case).where(Case.clinic_id == tenant.clinic_id)) or 0


def _denials(settings, tenant: Tenant) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        found = session.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.action == "auth.denied", AuditEvent.actor_key_id == tenant.key_id
            )
        )
        return [dict(detail or {}) for detail in found]


def _pid(session: Session) -> int:
    return int(session.scalar(text("SELECT pg_backend_pid()")))


def _blocked_by(settings, pid: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether a backend waits for a lock that backend ``pid`` holds, or is waiting for ahead of it."""
    with session_scope(settings) as session:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
        return bool(session.scalar(text(waiting), {"pid": pid}))


@contextmanager
def _submitting(
    client: TestClient, settings, tenant: Tenant, blocker: int, jpeg: bytes
) -> Iterator[Future[httpx.Response]]:  # type: ignore[no-untyped-def]
    """A submission sent now, once it waits for a lock backend ``blocker`` holds or waits for: it is
    past its authentication and its key's checks, at its INSERT."""
    with ThreadPoolExecutor(1) as pool:
        files = {"image": ("lesion.jpg", jpeg, "image/jpeg")}
        answer = pool.submit(client.post, "/v1/cases", headers=tenant.headers, files=files)
        support.wait_for(
            lambda: _blocked_by(settings, blocker),
            timeout=20,
            interval=0.02,
            what="the submission to wait at its INSERT",
        )
        yield answer


def test_a_clinic_deactivated_while_its_case_is_stored_has_nothing_stored(  # type: ignore[no-untyped-def]
    client: TestClient, settings, make_key, jpeg_bytes: bytes
) -> None:
    tenant = make_key()
    with session_scope(settings) as admin:
        clinics.set_active(admin, tenant.clinic_id, False)  # `dermq clinic deactivate`, not yet committed
        with _submitting(client, settings, tenant, _pid(admin), jpeg_bytes) as submitted:
            admin.commit()
            answer = submitted.result(timeout=30)
    assert (answer.status_code, answer.json().get("code")) == (401, "clinic_inactive"), answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert _stored(settings, tenant) == 0
    assert _denials(settings, tenant) == [{"reason": "clinic_inactive", "after": "upload"}]


def test_a_key_revoked_while_its_case_is_stored_has_nothing_stored(  # type: ignore[no-untyped-def]
    client: TestClient, settings, make_key, jpeg_bytes: bytes
) -> None:
    tenant = make_key()
    with session_scope(settings) as admin:
        keys.revoke_key(admin, tenant.key_id)  # `dermq key revoke`, not yet committed
        with _submitting(client, settings, tenant, _pid(admin), jpeg_bytes) as submitted:
            admin.commit()
            answer = submitted.result(timeout=30)
    assert (answer.status_code, answer.json().get("code")) == (401, "revoked_credentials"), answer.text
    assert _stored(settings, tenant) == 0
    assert _denials(settings, tenant) == [{"reason": "revoked_credentials", "after": "upload"}]


def test_a_revocation_waiting_for_a_case_in_flight_holds_back_the_next_ones(  # type: ignore[no-untyped-def]
    client: TestClient, settings, make_key, jpeg_bytes: bytes
) -> None:
    """A key kept busy can still be revoked: the revocation waits for the cases being stored when it
    asked, not for those sent after it, which wait for it and are refused. (Row locks shared by every
    submission let each new one in ahead of the waiting revocation: a key with uploads always in
    flight could not be revoked, the command failing at its lock timeout.)"""
    tenant = make_key()
    with session_scope(settings) as in_flight:  # a case being stored: the key's and clinic's locks held
        credential_locks.hold_for_a_case(in_flight, tenant.key_id, tenant.clinic_id)
        in_flight.execute(text("SELECT 1"))
        with ThreadPoolExecutor(1) as pool, session_scope(settings) as admin:
            revoker = _pid(admin)
            revoked = pool.submit(lambda: (keys.revoke_key(admin, tenant.key_id), admin.commit()))
            support.wait_for(lambda: _blocked_by(settings, _pid(in_flight)), timeout=20, what="the revocation to wait")
            # the next submission waits behind the revocation (not merely for the case in flight)
            with _submitting(client, settings, tenant, revoker, jpeg_bytes) as submitted:
                in_flight.commit()  # the case in flight stored: the revocation, then the next submission
                revoked.result(timeout=30)
                answer = submitted.result(timeout=30)
    assert (answer.status_code, answer.json().get("code")) == (401, "revoked_credentials"), answer.text
    assert _stored(settings, tenant) == 0
