"""api.fhir's mappings on their own (no database): what an EHR integration reads."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from api import fhir
from ml.labels import CLASSES

NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)


def case(status: str = "succeeded") -> SimpleNamespace:
    return SimpleNamespace(id=uuid.UUID(int=7), status=status, created_at=NOW)


def result(**fields: object) -> SimpleNamespace:
    values: dict[str, object] = {
        "model_id": "effnet-v3",
        "weights_sha256": "a" * 64,
        "device": "cpu",
        "created_at": NOW,
        "outcome": "diagnosis",
        "label": "bkl",
        "probabilities": dict.fromkeys(CLASSES, 1 / 7),
        "uncertainty": 0.25,
        "referral": False,
        "referral_reasons": [],
        "ood_reasons": [],
    }
    return SimpleNamespace(**(values | fields))


def test_a_class_without_a_verified_snomed_code_carries_dermqs_code_only() -> None:
    concept = fhir.class_concept("bkl")
    assert [c["system"] for c in concept["coding"]] == [fhir.HAM10000_SYSTEM]
    assert {c["system"] for c in fhir.class_concept("mel")["coding"]} == {fhir.SNOMED, fhir.HAM10000_SYSTEM}


def test_resource_ids_are_stable_and_references_resolve() -> None:
    first = fhir.case_bundle(case(), result(), now=NOW)
    assert first == fhir.case_bundle(case(), result(), now=NOW)
    Bundle.model_validate(first)
    urls = {e["fullUrl"] for e in first["entry"]}
    report = first["entry"][0]["resource"]
    assert {r["reference"] for r in report["result"]} <= urls
    assert all(
        e["resource"]["device"]["reference"] in urls
        for e in first["entry"]
        if e["resource"]["resourceType"] == "Observation"
    )


def test_a_referral_carries_its_reasons_and_the_conclusion_says_so() -> None:
    bundle = fhir.case_bundle(
        case(), result(label="mel", referral=True, referral_reasons=["concerning_class"]), now=NOW
    )
    Bundle.model_validate(bundle)
    referral = next(
        e["resource"] for e in bundle["entry"] if e["resource"].get("code", {}).get("text", "").startswith("Referral")
    )
    assert referral["valueBoolean"] is True and referral["note"] == [{"text": "reasons: concerning_class"}]
    assert (
        bundle["entry"][0]["resource"]["conclusion"].startswith("Melanoma")
        and "referral recommended" in (bundle["entry"][0]["resource"]["conclusion"])
    )


def test_a_label_the_decision_rule_chose_over_a_more_probable_class_is_not_called_the_most_likely() -> None:
    # docs/API.md's own example: mel chosen at 0.31 while nv has 0.60
    probabilities = dict.fromkeys(CLASSES, 0.09 / 5) | {"mel": 0.31, "nv": 0.60}
    bundle = fhir.case_bundle(case(), result(label="mel", probabilities=probabilities), now=NOW)
    resources = [e["resource"] for e in bundle["entry"]]
    conclusion = resources[0]["conclusion"]
    assert conclusion.startswith("Melanoma (chosen") and "need not be the most probable" in conclusion
    label = next(r for r in resources if r["resourceType"] == "Observation" and r.get("valueCodeableConcept"))
    assert "decision rule" in label["code"]["text"] and "likely" not in label["code"]["text"].lower()


@pytest.mark.parametrize(
    ("status", "expected"),
    [("succeeded", "final"), ("purged", "final"), ("running", "preliminary"), ("queued", "registered")],
)
def test_report_status_follows_the_case(status: str, expected: str) -> None:
    assert fhir.report_status(status) == expected


@pytest.mark.parametrize(
    ("action", "outcome", "crud", "code"),
    [
        ("case.create", "success", "C", "0"),
        ("case.read", "denied", "R", "4"),
        ("case.delete", "failure", "D", "8"),
        ("case.classify", "success", "E", "0"),
        # deletions of patient data that no clinic asked for are deletions too (they were "E")
        ("case.purge", "success", "D", "0"),
        ("keys.destroy_period", "success", "D", "0"),
        ("case.outcome", "success", "U", "0"),
        ("case.list", "success", "E", "0"),  # a search, as FHIR's codes define it
    ],
)
def test_audit_events_map_action_and_outcome(action: str, outcome: str, crud: str, code: str) -> None:
    record = {
        "id": 42,
        "occurred_at": NOW.isoformat(),
        "action": action,
        "outcome": outcome,
        "actor_type": "anonymous",
        "actor_key_id": None,
        "actor_role": None,
        "clinic_id": None,
        "source_ip": None,
        "user_agent": None,
        "request_id": None,
        "entity_type": None,
        "entity_id": None,
        "detail": {},
    }
    event = fhir.audit_event(record)
    AuditEvent.model_validate(event)
    assert (event["action"], event["outcome"], event["subtype"][0]["code"]) == (crud, code, action)
    assert "entity" not in event and event["agent"][0]["requestor"] is False


def test_every_audited_action_has_its_own_fhir_action_code() -> None:
    """A new action must be classified: guessed from its last word, a purge read as "execute"."""
    from core.audit import ACTIONS

    assert set(fhir.FHIR_ACTIONS) == set(ACTIONS)
    assert set(fhir.FHIR_ACTIONS.values()) <= {"C", "R", "U", "D", "E"}
