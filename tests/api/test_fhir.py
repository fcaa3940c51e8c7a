"""FHIR R4: a case's result as a Bundle, and the audit export as AuditEvents, validated with
fhir.resources' R4B models (DiagnosticReport, Observation, Device, AuditEvent and Bundle are the
same in R4 and R4B for what dermq sends). Real HTTP intake, Postgres and a real Celery worker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from api import fhir
from core.db import session_scope
from core.models import AuditEvent, Case, CaseStatus, Result
from ml.labels import CLASSES
from tests.api.test_cases import submit, wait_done
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def fhir_reads(settings, case_id: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == case_id, AuditEvent.action == "case.read")
        ).all()
        return [r for r in rows if r.detail.get("format") == "fhir"]


@pytest.fixture(scope="module")
def finished(client, worker, settings, keyring, fixture_images):  # type: ignore[no-untyped-def]
    from tests.conftest import new_tenant

    tenant = new_tenant(settings, keyring)
    response = submit(client, tenant, fixture_images["ISIC_0024313"].read_bytes())
    assert response.status_code == 202, response.text
    done = wait_done(client, tenant, response.json()["id"])
    assert done["status"] == "succeeded", done
    return tenant, done


def test_a_finished_case_is_a_valid_fhir_bundle(client, finished, settings) -> None:  # type: ignore[no-untyped-def]
    tenant, done = finished
    response = client.get(f"/v1/cases/{done['id']}/fhir", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    Bundle.model_validate(body)  # raises on anything R4 does not allow
    assert body["type"] == "collection"

    result = done["result"]
    (report,) = resources(body, "DiagnosticReport")
    assert report["status"] == "final"
    assert report["identifier"][0]["value"] == done["id"]
    label_codes = {c["code"] for c in report["conclusionCode"][0]["coding"]}
    assert result["label"] in label_codes
    if result["label"] in fhir.SNOMED_CODES:
        assert fhir.SNOMED_CODES[result["label"]][0] in label_codes

    observations = resources(body, "Observation")
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    label = by_code["label"]["valueCodeableConcept"]["coding"]
    assert {"system": fhir.HAM10000_SYSTEM, "code": result["label"]}.items() <= label[-1].items()
    for code in CLASSES:
        assert by_code[f"probability-{code}"]["valueQuantity"]["value"] == pytest.approx(
            result["probabilities"][code], abs=1e-6
        )
    assert by_code["uncertainty"]["valueQuantity"]["value"] == pytest.approx(result["uncertainty"], abs=1e-6)
    assert by_code["referral"]["valueBoolean"] is result["referral"]
    assert {r["reference"] for r in report["result"]} == {f"urn:uuid:{o['id']}" for o in observations}

    (device,) = resources(body, "Device")
    assert device["deviceName"][0]["name"] == result["model"]["id"]
    assert device["version"][0]["value"] == result["model"]["weights_sha256"]
    assert all(o["device"]["reference"] == f"urn:uuid:{device['id']}" for o in observations)

    assert len(fhir_reads(settings, done["id"])) >= 1  # the read is audited


def test_melanoma_carries_its_snomed_code(client, finished) -> None:  # type: ignore[no-untyped-def]
    concept = fhir.class_concept("mel")
    assert concept["coding"][0] == {"system": fhir.SNOMED, "code": "372244006", "display": "Malignant melanoma"}


def test_another_clinic_gets_404_and_the_probe_is_audited(client, finished, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    _, done = finished
    other = make_key("clinic")
    response = client.get(f"/v1/cases/{done['id']}/fhir", headers=other.headers)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "probabilities" not in response.text
    # filed as a FHIR read, as the route's other answers are: an auditor tells this probe from a JSON one
    with session_scope(settings) as session:
        probes = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == done["id"], AuditEvent.actor_key_id == other.key_id)
        ).all()
    # one event filed under each clinic: the prober's, and the owner's (whose auditors see the probe)
    assert sorted((e.action, e.outcome, e.detail.get("format"), e.clinic_id == other.clinic_id) for e in probes) == [
        ("case.read", "denied", "fhir", False),
        ("case.read", "denied", "fhir", True),
    ]


def test_an_unfinished_case_is_409(client, tenant: Tenant, store_case, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"not classified yet")
    response = client.get(f"/v1/cases/{case_id}/fhir", headers=tenant.headers)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "case_not_finished"
    with session_scope(settings) as session:
        refused = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.read")
        ).all()
    assert [(e.outcome, e.detail.get("format")) for e in refused] == [("failure", "fhir")]


@pytest.mark.parametrize("route", ["fhir", "heatmap.png", "outcome"])
def test_a_failed_case_says_it_failed_not_that_it_has_not_finished(
    client, tenant: Tenant, store_case, settings, route: str
) -> None:  # type: ignore[no-untyped-def]
    """409 ``case_not_finished`` for a case that had ended failed kept a FHIR client polling, and a
    portal retrying a heat map or an outcome report while it "waits", for good."""
    from core import case_states

    case_id = store_case(tenant, b"never classified")
    with session_scope(settings) as session:
        case_states.fail_case(session, case_id=case_id, attempt=None, code="timeout", message="ran out of time")
    path = f"/v1/cases/{case_id}/{route}"
    if route == "outcome":
        response = client.post(path, headers=tenant.headers, json={"diagnosis": "mel", "method": "histo"})
    else:
        response = client.get(path, headers=tenant.headers)
    assert response.status_code == 409 and response.json()["code"] == "case_failed", response.text
    assert "timeout" in response.json()["detail"]
    if route == "fhir":
        assert "submit the image again" in response.json()["detail"]
    with session_scope(settings) as session:
        refused = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == str(case_id), AuditEvent.actor_type == "api_key")
        ).all()
    assert [(event.outcome, event.detail["reason"]) for event in refused] == [("failure", "failed")]


def test_an_out_of_distribution_case_has_no_diagnosis(client, tenant: Tenant, store_case, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"an image the gate refused")
    with session_scope(settings) as session:
        session.add(
            Result(
                case_id=case_id,
                outcome="out_of_distribution",
                ood_reasons=["blank"],
                gradcam_status="not_applicable",
                model_id="test-model",
                weights_sha256="b" * 64,
                device="cpu",
                timings={},
            )
        )
        session.get(Case, case_id).status = CaseStatus.SUCCEEDED.value
    response = client.get(f"/v1/cases/{case_id}/fhir", headers=tenant.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    Bundle.model_validate(body)
    (report,) = resources(body, "DiagnosticReport")
    assert "conclusionCode" not in report and "blank or almost uniform" in report["conclusion"]
    observations = resources(body, "Observation")
    assert [o["code"]["coding"][0]["code"] for o in observations] == ["out-of-distribution"]
    assert not any("valueQuantity" in o or "valueCodeableConcept" in o for o in observations)


def test_the_audit_export_as_fhir_validates(client, finished, make_key) -> None:  # type: ignore[no-untyped-def]
    tenant, done = finished
    client.get(f"/v1/cases/{done['id']}/fhir", headers=tenant.headers)
    auditor = make_key("auditor")
    now = datetime.now(UTC)
    params = {
        "format": "fhir",
        "case": done["id"],
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(minutes=1)).isoformat(),
    }
    response = client.get("/v1/audit-events/export", headers=auditor.headers, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    Bundle.model_validate(body)
    events = [e["resource"] for e in body["entry"]]
    for event in events:
        FhirAuditEvent.model_validate(event)
    actions = [e["subtype"][0]["code"] for e in events]
    assert "case.create" in actions and "case.read" in actions
    create = events[actions.index("case.create")]
    assert create["action"] == "C" and create["outcome"] == "0"
    assert create["entity"][0]["what"]["identifier"]["value"] == done["id"]
    assert str(tenant.key_id) in {e["agent"][0]["who"].get("identifier", {}).get("value") for e in events}


def test_an_empty_fhir_export_is_an_empty_bundle(client, make_key) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    now = datetime.now(UTC)
    params = {
        "format": "fhir",
        "case": str(uuid.uuid4()),
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": now.isoformat(),
    }
    body = client.get("/v1/audit-events/export", headers=auditor.headers, params=params).json()
    Bundle.model_validate(body)
    assert body["entry"] == []
