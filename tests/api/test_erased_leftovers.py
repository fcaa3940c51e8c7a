"""What an older release (or a race) left on an erased case: a client reference in plain text, a blob.
It is never shown, never sealed again (a blob keeps its period key from being destroyed), and a
second erasure shreds it; migration 0018 shreds it once for every case purged before
(tests/core/test_erased_client_ref_migration.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update

from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob
from tests.conftest import Tenant
from worker.tasks import sweep_once


def test_an_erased_case_s_leftovers_are_not_shown_not_sealed_and_shredded_by_another_erasure(  # type: ignore[no-untyped-def]
    client, settings, tenant: Tenant, store_case, publisher
) -> None:
    marker = f"MRN-{uuid.uuid4().hex[:10]}"
    case_id = store_case(tenant, b"an old case")
    assert client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).json()["status"] == "purged"
    with session_scope(settings) as session:  # as a purge before this release left it, and a race's blob
        session.execute(update(Case).where(Case.id == case_id).values(plain_client_ref=marker))
        session.add(
            CaseBlob(
                case_id=case_id,
                kind="heatmap",
                ciphertext=b"left",
                nonce=bytes(12),
                wrapped_key=b"k",
                kek_id="period-2026-12",
                media_type="image/png",
            )
        )

    shown = client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()
    assert (shown["status"], shown["client_ref"]) == ("purged", None)
    listed = next(c for c in client.get("/v1/cases", headers=tenant.headers).json()["items"] if c["id"] == str(case_id))
    assert listed["client_ref"] is None
    sweep_once(settings, publisher, None)  # seals references stored in plain text: never an erased case's
    with session_scope(settings) as session:
        assert session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all() == ["heatmap"]

    again = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert again.status_code == 200 and again.json()["status"] == "purged"
    with session_scope(settings) as session:
        assert session.scalar(select(Case.plain_client_ref).where(Case.id == case_id)) is None
        assert session.scalars(select(CaseBlob.id).where(CaseBlob.case_id == case_id)).all() == []
        erasures = session.scalars(
            select(AuditEvent.detail)
            .where(AuditEvent.action == "case.delete", AuditEvent.entity_id == str(case_id))
            .order_by(AuditEvent.id)
        ).all()
    assert erasures[-1] == {"reason": "clinic_request", "already": True, "blobs": 1}


def test_an_erased_case_s_plain_findings_and_diagnosis_are_emptied_by_the_sweep_not_sealed(  # type: ignore[no-untyped-def]
    client, settings, keyring, tenant: Tenant, store_case
) -> None:
    """The result and diagnosis sweepers sealed what an older release left in plain text on an erased
    case: a blob under its period's key, which then could never be destroyed (as commit e00653b found
    for client references). They empty it instead."""
    from core import outcomes, results
    from core.models import SEALED_RESULT_FIELDS, Result
    from core.outcome_models import ConfirmedOutcome
    from tests.core.test_phi import LEGACY_DIAGNOSIS

    case_id = store_case(tenant, b"an old case, erased")
    assert client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).json()["status"] == "purged"
    with session_scope(settings) as session:  # as a purge before this release left them
        common = {"model_id": "legacy-model", "weights_sha256": "c" * 64, "device": "cpu", "timings": {}}
        session.add(Result(case_id=case_id, **common, **LEGACY_DIAGNOSIS))
        session.add(ConfirmedOutcome(case_id=case_id, clinic_id=tenant.clinic_id, diagnosis="mel", method="histo"))
    with session_scope(settings) as session:
        while results.seal_plain_results(session, keyring) + outcomes.seal_plain_diagnoses(session, keyring):
            pass
    with session_scope(settings) as session:
        assert session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all() == []
        row = session.get(Result, case_id)
        assert row is not None and all(getattr(row, name) is None for name in SEALED_RESULT_FIELDS)
        assert session.get(ConfirmedOutcome, case_id) is None
