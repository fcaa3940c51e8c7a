"""A clinic's activation and a key's revocation read the row again under their lock: a caller (the
CLI's `dermq clinic deactivate`) that loaded it before another change committed decided on the old
values, reported a change it did not make, and left the clinic active with its keys working."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core import clinics, keys
from core.db import session_scope
from core.models import ApiKey, AuditEvent, Clinic

pytestmark = pytest.mark.usefixtures("database")


def test_a_deactivation_decided_on_a_stale_read_still_deactivates(settings, make_key) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    with session_scope(settings) as session:
        clinics.set_active(session, tenant.clinic_id, False)
    with session_scope(settings) as operator:
        seen = clinics.get_clinic(operator, tenant.clinic_id)  # inactive, as the operator's command read it
        assert seen.active is False
        with session_scope(settings) as admin:  # meanwhile an admin reactivates it, and commits
            clinics.set_active(admin, tenant.clinic_id, True)
        clinics.set_active(operator, tenant.clinic_id, False)
    with session_scope(settings) as session:
        assert session.scalar(select(Clinic.active).where(Clinic.id == tenant.clinic_id)) is False
        last = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "clinic.deactivate", AuditEvent.entity_id == str(tenant.clinic_id))
            .order_by(AuditEvent.id.desc())
        ).first()
        assert last is not None and last.detail in (None, {})  # a change, not "unchanged"


def test_a_revocation_decided_on_a_stale_read_keeps_the_first_revocation_time(settings, make_key) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key()
    with session_scope(settings) as operator:
        seen = operator.get(ApiKey, tenant.key_id)
        assert seen is not None and seen.revoked_at is None
        with session_scope(settings) as admin:  # revoked meanwhile, elsewhere
            first = keys.revoke_key(admin, tenant.key_id).revoked_at
        keys.revoke_key(operator, tenant.key_id)
    with session_scope(settings) as session:
        assert session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == tenant.key_id)) == first
