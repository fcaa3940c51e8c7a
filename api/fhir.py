"""FHIR R4 views of a case's result and of audit events: pure mappings, no database access.

A finished case becomes a ``collection`` Bundle: a DiagnosticReport (the triage), Observations (the
label, each class probability, the uncertainty and the referral flag) and the Device that produced
them (the model id and its weights' SHA-256), which every Observation references. An out-of-distribution
result is a DiagnosticReport without a diagnosis: its conclusion says why, no label or probabilities.

Resource ids are name-based UUIDs of the case id, so the same case always gives the same ids.

SNOMED CT codes for the HAM10000 classes. Only concepts whose meaning was checked are given; the
others carry the dermq HAM10000 code alone (``HAM10000_SYSTEM``) rather than a guessed concept:

- mel   372244006 "Malignant melanoma (disorder)": FSN in a published SNOMED CT concept list, and
        used for melanoma by several public FHIR implementations.
- bcc   254701007 "Basal cell carcinoma of skin (disorder)": FSN as used by several public FHIR
        profiles and dermatology code lists (not checked against a terminology server).
- akiec 201101007 "Actinic keratosis (disorder)": the concept DICOM PS3.16 lists for "Actinic
        keratosis" in its context group CID 4405 (Skin Disorder). akiec also covers Bowen's disease
        (intraepithelial carcinoma), which this concept does not: the dermq code beside it says which.
- nv    400096001 "Melanocytic nevus (disorder)": checked on a FHIR terminology server's SNOMED CT
        browser (tx.fhir.org-style page, UK edition 2023-04-12).
- bkl, df, vasc: no code could be verified, so none is sent. Candidates seen, all UNVERIFIED and to
        check in a SNOMED CT browser before use: df 427186000 (VisualDx) or 72464004 (a coding site;
        the two disagree); seborrheic keratosis (one kind of bkl) 446352002 (5-Minute Clinical
        Consult, name truncated); bkl also covers solar lentigo and lichen planus-like keratosis,
        so no single concept fits it; vasc (angioma, angiokeratoma, pyogenic granuloma,
        haemorrhage) likewise has no single concept.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from api.case_views import out_of_distribution_message
from core.models import CaseStatus, Outcome
from ml.labels import BY_CODE, CLASSES

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
HAM10000_SYSTEM = "urn:dermq:ham10000"
OBSERVATION_SYSTEM = "urn:dermq:observation"
CASE_SYSTEM = "urn:dermq:case"
MODEL_SYSTEM = "urn:dermq:model"
AUDIT_ACTION_SYSTEM = "urn:dermq:audit-action"
API_KEY_SYSTEM = "urn:dermq:api-key"
MEDIA_TYPE = "application/fhir+json"

#: SNOMED CT concept per class (see the module docstring for sources and what is unverified)
SNOMED_CODES: dict[str, tuple[str, str]] = {
    "mel": ("372244006", "Malignant melanoma"),
    "bcc": ("254701007", "Basal cell carcinoma of skin"),
    "akiec": ("201101007", "Actinic keratosis"),
    "nv": ("400096001", "Melanocytic nevus"),
}


def class_concept(code: str) -> dict[str, Any]:
    """A CodeableConcept for a HAM10000 class: its SNOMED CT concept where known, and dermq's code."""
    name = BY_CODE[code].name
    codings = []
    if code in SNOMED_CODES:
        sct, display = SNOMED_CODES[code]
        codings.append({"system": SNOMED, "code": sct, "display": display})
    codings.append({"system": HAM10000_SYSTEM, "code": code, "display": name})
    return {"coding": codings, "text": name}


def _concept(code: str, text: str) -> dict[str, Any]:
    return {"coding": [{"system": OBSERVATION_SYSTEM, "code": code, "display": text}], "text": text}


def _id(case_id: uuid.UUID, name: str) -> str:
    return str(uuid.uuid5(case_id, name))


def _ref(resource_id: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{resource_id}"}


def _instant(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds")


def _fraction(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": UCUM, "code": "1"}


def report_status(case_status: str) -> str:
    """DiagnosticReport.status: a succeeded (or since erased) case's result is final; one still
    queued or running is registered/preliminary (the route answers those with 409 instead)."""
    status = CaseStatus(case_status)
    if status in (CaseStatus.SUCCEEDED, CaseStatus.PURGED):
        return "final"
    if status is CaseStatus.RUNNING:
        return "preliminary"
    if status is CaseStatus.FAILED:
        return "cancelled"
    return "registered"


def case_bundle(case: Any, result: Any, *, now: datetime) -> dict[str, Any]:
    """The FHIR R4 Bundle (type ``collection``) of a case (``core.models.Case``) and its result
    (``core.results.ResultView``: the findings opened)."""
    device_id = _id(case.id, f"device:{result.model_id}:{result.weights_sha256}")
    device = {
        "resourceType": "Device",
        "id": device_id,
        "identifier": [{"system": MODEL_SYSTEM, "value": result.model_id}],
        "manufacturer": "dermq",
        "deviceName": [{"name": result.model_id, "type": "model-name"}],
        "type": {"text": "dermoscopy image classifier (software)"},
        "version": [{"type": {"text": "weights-sha256"}, "value": result.weights_sha256}],
        "property": [{"type": {"text": "inference device"}, "valueCode": [{"text": result.device}]}],
    }
    issued = _instant(result.created_at)
    effective = _instant(case.created_at)
    observations: list[dict[str, Any]] = []

    def observation(name: str, code: dict[str, Any], **value: Any) -> dict[str, Any]:
        resource = {
            "resourceType": "Observation",
            "id": _id(case.id, f"observation:{name}"),
            "status": "final",
            "code": code,
            "effectiveDateTime": effective,
            "issued": issued,
            "device": _ref(device_id),
            **value,
        }
        observations.append(resource)
        return resource

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _id(case.id, "report"),
        "identifier": [{"system": CASE_SYSTEM, "value": str(case.id)}],
        "status": report_status(case.status),
        "code": _concept("dermoscopy-triage", "Dermoscopy image triage (decision support, not a diagnosis)"),
        "effectiveDateTime": effective,
        "issued": issued,
    }
    if result.outcome == Outcome.OUT_OF_DISTRIBUTION:
        report["conclusion"] = out_of_distribution_message(list(result.ood_reasons))
        observation(
            "out-of-distribution",
            _concept("out-of-distribution", "Image out of distribution: no diagnosis made"),
            valueBoolean=True,
            note=[{"text": "reasons: " + ", ".join(result.ood_reasons)}],
        )
    else:
        label = observation(
            "label",
            # the balanced decision rule's class, which may differ from the most probable one (docs/API.md)
            _concept("label", "HAM10000 class chosen by the decision rule"),
            valueCodeableConcept=class_concept(result.label),
        )
        members = [_ref(label["id"])]
        for code in CLASSES:
            if code in (result.probabilities or {}):
                prob = observation(
                    f"probability:{code}",
                    _concept(f"probability-{code}", f"Calibrated probability of {BY_CODE[code].name}"),
                    valueQuantity=_fraction(result.probabilities[code]),
                )
                members.append(_ref(prob["id"]))
        label["hasMember"] = members[1:]
        observation(
            "uncertainty",
            _concept("uncertainty", "Uncertainty of the triage"),
            valueQuantity=_fraction(result.uncertainty),
        )
        referral: dict[str, Any] = {"valueBoolean": bool(result.referral)}
        if result.referral_reasons:
            referral["note"] = [{"text": "reasons: " + ", ".join(result.referral_reasons)}]
        observation("referral", _concept("referral", "Referral to a clinician recommended"), **referral)
        report["conclusion"] = (
            f"{BY_CODE[result.label].name} (chosen among the seven HAM10000 classes by dermq's decision rule, "
            "which weighs each class's calibrated probability against its prevalence, so it need not be the most "
            "probable class; decision support, "
            f"not a diagnosis){'; referral recommended' if result.referral else ''}"
        )
        report["conclusionCode"] = [class_concept(result.label)]
    report["result"] = [_ref(o["id"]) for o in observations]
    resources = [report, *observations, device]
    return {
        "resourceType": "Bundle",
        "id": _id(case.id, "bundle"),
        "type": "collection",
        "timestamp": _instant(now),
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


# --------------------------------------------------------------------------- audit events

#: FHIR AuditEvent.action per dermq action (core.audit.ACTIONS; every one is here): C create, R read,
#: U update, D delete, E execute (a system function, a log-on, a search). An auditor's SIEM that asks
#: for the deletions of patient data (``action = D``) must find retention's purges and destroyed period
#: keys among them, not only the erasures a clinic asked for.
FHIR_ACTIONS = {
    "auth.denied": "E",
    "access.denied": "E",
    "case.create": "C",
    "case.replay": "R",
    "case.read": "R",
    "case.list": "E",
    "heatmap.read": "R",
    "case.delete": "D",
    "case.outcome": "U",
    "case.start": "E",
    "case.classify": "E",
    "case.fail": "E",
    "case.requeue": "E",
    "case.purge": "D",
    "callback.register": "C",
    "callback.unregister": "D",
    "callback.end_overlap": "U",
    "callback.read": "R",
    "callback.deliver": "E",
    "drift.read": "R",
    "clinic.create": "C",
    "clinic.activate": "U",
    "clinic.deactivate": "U",
    "key.create": "C",
    "key.list": "E",
    "key.revoke": "U",
    "keys.rotate": "E",
    "keys.rewrap": "U",
    "keys.retire": "D",
    "keys.destroy_period": "D",
    "audit.query": "E",
    "audit.export": "R",
    "audit.verify": "R",
    "audit.checkpoint": "R",
    "audit.proof": "R",
}
_OUTCOMES = {"success": "0", "failure": "8", "denied": "4"}


def _crud(action: str) -> str:
    return FHIR_ACTIONS.get(action, "E")


def audit_event(record: dict[str, Any]) -> dict[str, Any]:
    """One export record (:func:`core.audit.as_record`) as a FHIR R4 AuditEvent."""
    who: dict[str, Any] = {"display": record["actor_type"]}
    if record.get("actor_key_id"):
        who = {
            "identifier": {"system": API_KEY_SYSTEM, "value": record["actor_key_id"]},
            "display": record["actor_type"],
        }
    agent: dict[str, Any] = {"who": who, "requestor": record["actor_type"] in ("api_key", "cli")}
    if record.get("actor_role"):
        agent["role"] = [{"text": record["actor_role"]}]
    if record.get("source_ip"):
        agent["network"] = {"address": record["source_ip"], "type": "2"}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"dermq-{record['id']}",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": AUDIT_ACTION_SYSTEM, "code": record["action"]}],
        "action": _crud(record["action"]),
        "recorded": record["occurred_at"],
        "outcome": _OUTCOMES.get(record["outcome"], "8"),
        "outcomeDesc": record["outcome"],
        "agent": [agent],
        "source": {"site": "dermq", "observer": {"display": "dermq"}},
    }
    entities: list[dict[str, Any]] = []
    if record.get("entity_id"):
        entities.append(
            {
                "what": {
                    "identifier": {
                        "system": f"urn:dermq:{record['entity_type'] or 'entity'}",
                        "value": record["entity_id"],
                    }
                },
                "detail": [{"type": "detail", "valueString": json.dumps(record.get("detail") or {}, sort_keys=True)}],
            }
        )
    elif record.get("detail"):
        entities.append({"detail": [{"type": "detail", "valueString": json.dumps(record["detail"], sort_keys=True)}]})
    if record.get("clinic_id"):
        entities.append({"what": {"identifier": {"system": "urn:dermq:clinic", "value": record["clinic_id"]}}})
    if entities:
        event["entity"] = entities
    return event
