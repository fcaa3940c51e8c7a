"""Every answer that touches a case is in the audit trail: replays, refused replays, heat-map
refusals, the list views that showed a case (so "who saw case X" finds them), and refused exports."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from core.db import session_scope
from core.models import AuditEvent
from tests.conftest import Tenant


def events_for(settings, case_id: str | uuid.UUID) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.entity_id == str(case_id)).order_by(AuditEvent.id)
            ).all()
        )


def submit(client, tenant: Tenant, data: bytes, key: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/cases",
        headers={**tenant.headers, "Idempotency-Key": key},
        files={"image": ("lesion.jpg", data, "image/jpeg")},
    )


def test_an_idempotent_replay_and_a_reused_key_are_audited(
    client, settings, tenant: Tenant, jpeg_bytes, fixture_images
) -> None:  # type: ignore[no-untyped-def]
    key = f"visit-{uuid.uuid4().hex}"
    first = submit(client, tenant, jpeg_bytes, key)
    replay = submit(client, tenant, jpeg_bytes, key)
    other_image = next(p for p in fixture_images.values() if p.read_bytes() != jpeg_bytes).read_bytes()
    reused = submit(client, tenant, other_image, key)
    assert (first.status_code, replay.status_code, reused.status_code) == (202, 200, 409)
    case_id = first.json()["id"]
    actions = [(e.action, e.outcome, e.detail.get("reason")) for e in events_for(settings, case_id)]
    assert ("case.replay", "success", None) in actions
    assert ("case.create", "denied", "idempotency_key_reused") in actions


def test_every_heat_map_answer_is_audited(client, settings, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued, no heat map yet")
    assert client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers).status_code == 409
    refused = [e for e in events_for(settings, case_id) if e.action == "heatmap.read"]
    assert [(e.outcome, e.detail["reason"], e.clinic_id) for e in refused] == [
        ("failure", "not_finished", tenant.clinic_id)
    ]


def test_a_list_view_records_the_cases_it_showed(client, settings, make_key, store_case) -> None:  # type: ignore[no-untyped-def]
    tenant, auditor = make_key("clinic"), make_key("auditor")
    shown = [store_case(tenant, f"case {i}".encode()) for i in range(3)]
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    found = client.get(f"/v1/audit-events?case={shown[1]}&action=case.list", headers=auditor.headers)
    assert found.status_code == 200
    items = found.json()["items"]
    assert len(items) == 1 and items[0]["actor_key_id"] == str(tenant.key_id)
    assert set(items[0]["detail"]["ids"]) >= {str(c) for c in shown}
    # the view as the clinic asked for it: every filter, not the status alone (a list of urgent cases of one
    # week was filed as a list of all of them)
    since = datetime.now(UTC) - timedelta(hours=1)
    asked = {"status": "queued", "priority": "routine", "since": since.isoformat()}
    assert client.get("/v1/cases", params=asked, headers=tenant.headers).status_code == 200
    found = client.get(f"/v1/audit-events?case={shown[1]}&action=case.list", headers=auditor.headers)
    detail = found.json()["items"][0]["detail"]  # newest first
    assert (detail["status"], detail["priority"], detail["until"]) == ("queued", "routine", None)
    assert datetime.fromisoformat(detail["since"]) == since


def test_an_export_refused_to_a_clinic_scoped_auditor_is_filed_as_an_export(
    client, settings, make_key, keyring
) -> None:  # type: ignore[no-untyped-def]
    """Filed as ``audit.query`` without its format, a search of the trail for ``audit.export`` missed it."""
    from core import keys
    from core.models import Role

    mine, other = make_key("clinic"), make_key("clinic")
    with session_scope(settings) as session:
        _, token = keys.create_key(session, keyring, role=Role.AUDITOR, clinic_id=mine.clinic_id)
    now = datetime.now(UTC)
    params = {"clinic": str(other.clinic_id), "format": "csv", "since": (now - timedelta(hours=1)).isoformat()}
    export = client.get(
        "/v1/audit-events/export",
        headers={"Authorization": f"Bearer {token}"},
        params={**params, "until": now.isoformat()},
    )
    assert (export.status_code, export.json()["code"]) == (403, "clinic_scope")
    with session_scope(settings) as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.request_id == export.headers["X-Request-ID"]))
        assert [(e.action, e.outcome, e.detail) for e in denied] == [
            ("audit.export", "denied", {"format": "csv", "reason": "clinic_scope"})
        ]
