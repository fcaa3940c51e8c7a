"""Query times are ISO 8601, never numbers of seconds, on every route that takes them; and an
auditor's failed inclusion proofs leave a trace (a clinic's auditor walking other clinics' event ids
was not audited)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import AuditEvent
from tests.support import seal_all

pytestmark = pytest.mark.usefixtures("database")


def test_times_are_read_as_iso_8601_never_as_seconds(client, make_key) -> None:  # type: ignore[no-untyped-def]
    """``since=20260101`` (ISO 8601's basic form) was read as Unix seconds, 1970-08-23: the search found
    nothing and the export answered 200 with an empty file, and the auditor read "no events"."""
    auditor, clinic = make_key("auditor"), make_key()
    today = datetime.now(UTC)
    compact = {"since": today.strftime("%Y%m%d"), "until": (today + timedelta(days=1)).strftime("%Y%m%d")}
    client.get("/v1/cases", headers=clinic.headers)  # an event today
    found = client.get("/v1/audit-events", headers=auditor.headers, params=compact)
    assert found.status_code == 200 and found.json()["items"], found.text
    exported = client.get("/v1/audit-events/export", headers=auditor.headers, params=compact)
    assert exported.status_code == 200 and exported.text.strip()
    for number in ("1764892800", "2026", "1.7e9", ".5", "-.5"):
        for path in ("/v1/audit-events", "/v1/audit-events/export", "/v1/cases"):
            headers = clinic.headers if path == "/v1/cases" else auditor.headers
            refused = client.get(path, headers=headers, params={"since": number})
            assert refused.status_code == 422 and "ISO 8601" in refused.text, (path, refused.text)


def test_an_auditor_probing_another_clinics_events_leaves_a_trace_under_both(
    client, make_key, settings, keyring
) -> None:  # type: ignore[no-untyped-def]
    from core import keys
    from core.models import Role

    mine, theirs = make_key(), make_key()
    client.get("/v1/cases", headers=theirs.headers)  # an event of the other clinic
    seal_all(settings)
    with session_scope(settings) as session:
        _, token = keys.create_key(session, keyring, role=Role.AUDITOR, clinic_id=mine.clinic_id)
        event = session.scalar(
            select(AuditEvent.id).where(AuditEvent.clinic_id == theirs.clinic_id).order_by(AuditEvent.id.desc())
        )
    scoped = {"Authorization": f"Bearer {token}"}
    probe = client.get("/v1/audit/proofs/inclusion", headers=scoped, params={"event": event})
    assert probe.status_code == 404 and probe.json()["code"] == "not_found"  # the same as no event at all
    with session_scope(settings) as session:
        traces = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "audit.proof", AuditEvent.outcome == "denied")
        ).all()
        found = [t for t in traces if t.detail.get("event") == event]
    assert {t.clinic_id for t in found} == {mine.clinic_id, theirs.clinic_id}
    assert all(t.detail["reason"] == "not_found" for t in found)
