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

from core import clinics, keys
from core.db import session_scope
from core.models import AuditEvent, Case, Clinic
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


@contextmanager
def _submitting(
    client: TestClient, settings, tenant: Tenant, holder: Session, jpeg: bytes
) -> Iterator[Future[httpx.Response]]:  # type: ignore[no-untyped-def]
    """A submission sent now, once it waits for a row lock ``holder``'s transaction holds: it is past
    its authentication and its key's checks, at its INSERT."""
    pid = holder.scalar(text("SELECT pg_backend_pid()"))
    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")

    def held() -> bool:
        with session_scope(settings) as session:
            return bool(session.scalar(waiting, {"pid": pid}))

    with ThreadPoolExecutor(1) as pool:
        files = {"image": ("lesion.jpg", jpeg, "image/jpeg")}
        answer = pool.submit(client.post, "/v1/cases", headers=tenant.headers, files=files)
        support.wait_for(held, timeout=20, interval=0.02, what="the submission to wait at its INSERT")
        yield answer


def test_a_clinic_deactivated_while_its_case_is_stored_has_nothing_stored(  # type: ignore[no-untyped-def]
    client: TestClient, settings, make_key, jpeg_bytes: bytes
) -> None:
    tenant = make_key()
    with session_scope(settings) as admin:
        clinics.set_active(admin, tenant.clinic_id, False)  # `dermq clinic deactivate`, not yet committed
        with _submitting(client, settings, tenant, admin, jpeg_bytes) as submitted:
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
    with session_scope(settings) as hold:
        # the clinic's row held, as a deactivation holds it: the submission waits at its INSERT
        hold.scalar(select(Clinic.id).where(Clinic.id == tenant.clinic_id).with_for_update())
        with _submitting(client, settings, tenant, hold, jpeg_bytes) as submitted:
            with session_scope(settings) as session:  # `dermq key revoke`, committed meanwhile
                keys.revoke_key(session, tenant.key_id)
            hold.rollback()  # the clinic unchanged
            answer = submitted.result(timeout=30)
    assert (answer.status_code, answer.json().get("code")) == (401, "revoked_credentials"), answer.text
    assert _stored(settings, tenant) == 0
    assert _denials(settings, tenant) == [{"reason": "revoked_credentials", "after": "upload"}]
