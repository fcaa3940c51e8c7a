"""Request and response schemas (Pydantic), kept apart from the ORM models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml.labels import BY_CODE, CLASSES

Status = Literal["queued", "running", "succeeded", "failed", "purged"]
PriorityName = Literal["routine", "urgent"]


class Problem(BaseModel):
    """RFC 9457 problem details, with dermq's stable ``code``."""

    type: str = Field(examples=["https://dermq.example/problems/invalid_image"])
    title: str
    status: int
    detail: str
    code: str = Field(description="stable machine-readable error code")
    instance: str | None = None
    request_id: str | None = None


class ModelRef(BaseModel):
    id: str
    weights_sha256: str


class DiagnosisOut(BaseModel):
    """The result of a case the model could judge: calibrated probabilities, label and referral."""

    outcome: Literal["diagnosis"] = Field(description="the model judged the image: read the fields below")
    label: str = Field(description=f"one of {', '.join(CLASSES)} (balanced decision rule; see the model card)")
    label_name: str
    probabilities: dict[str, float] = Field(
        description="calibrated probability of each of the seven classes; sums to 1"
    )
    confidence: float = Field(ge=0, le=1, description="calibrated probability of the label")
    uncertainty: float = Field(ge=0, le=1, description="normalised predictive entropy (0 certain, 1 uniform)")
    referral: bool = Field(description="true: a clinician should review this lesion")
    referral_reasons: list[str]
    gradcam_status: Literal["ok", "timeout", "error"]
    model: ModelRef
    device: str
    timings: dict[str, float] = Field(description="seconds spent in each stage")
    created_at: datetime


class OutOfDistributionOut(BaseModel):
    """The result of a case whose image the model cannot judge (not a dermoscopy image of a skin
    lesion: blank, noise, a photograph, ...). No diagnosis was made: there is no label, no
    probabilities, no referral and no heat map. Show ``message`` and ask for a new image."""

    outcome: Literal["out_of_distribution"] = Field(
        description="the image is not one the model can judge; no diagnosis was made"
    )
    ood_reasons: list[str] = Field(
        min_length=1,
        description="why: blank (no contrast), noise, colour (unlike dermoscopy), energy (the model recognises "
        "nothing), feature_distance (unlike the training lesions); more reasons may be added",
        examples=[["blank"]],
    )
    message: str = Field(description="plain-language explanation to show the clinician")
    gradcam_status: Literal["not_applicable"] = Field(description="no heat map: there is no diagnosis to explain")
    model: ModelRef
    device: str
    timings: dict[str, float] = Field(description="seconds spent in each stage")
    created_at: datetime


#: a succeeded case's result; ``outcome`` says which of the two it is
ResultOut = Annotated[DiagnosisOut | OutOfDistributionOut, Field(discriminator="outcome")]


class FailureOut(BaseModel):
    code: str = Field(examples=["invalid_image", "timeout", "model_error"])
    message: str


class ImageOut(BaseModel):
    format: str
    width: int
    height: int
    bytes: int


class CaseLinks(BaseModel):
    self: str
    heatmap: str | None = None


class CaseOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "A case: one dermoscopy image and its triage"})

    id: uuid.UUID
    status: Status
    priority: PriorityName
    client_ref: str | None
    attempts: int
    image: ImageOut | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: ResultOut | None = None
    failure: FailureOut | None = None
    links: CaseLinks


class CaseSummary(BaseModel):
    id: uuid.UUID
    status: Status
    priority: PriorityName
    client_ref: str | None
    #: once succeeded: `diagnosis` or `out_of_distribution`, and for a diagnosis its label and referral flag
    outcome: Literal["diagnosis", "out_of_distribution"] | None = None
    label: str | None = None
    referral: bool | None = None
    created_at: datetime
    updated_at: datetime
    links: CaseLinks


class CasePage(BaseModel):
    items: list[CaseSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null at the end")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


def label_name(code: str) -> str:
    return BY_CODE[code].name


class AuditEventOut(BaseModel):
    """One audit record (FHIR AuditEvent fields). Never image data, probabilities or secrets."""

    id: int
    occurred_at: datetime
    action: str
    outcome: Literal["success", "failure", "denied"]
    actor_type: str
    actor_key_id: uuid.UUID | None
    actor_role: str | None
    clinic_id: uuid.UUID | None
    source_ip: str | None
    user_agent: str | None
    request_id: str | None
    entity_type: str | None
    entity_id: str | None
    detail: dict[str, object]
    prev_hash: str | None = Field(description="the old hash chain (events before the Merkle log only)")
    hash: str | None = Field(description="the old hash chain (events before the Merkle log only)")


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null at the end")


class ChainReportOut(BaseModel):
    ok: bool | None = Field(description="null until the first periodic check has run")
    checked: int = Field(description="events verified (before the first bad one, if any)")
    first_bad_id: int | None = Field(description="the first missing or altered event, when known")
    first_bad_position: int | None = None
    reason: str | None
    last_hash: str | None = Field(description="base64 root hash of the verified tree")
    tree_size: int = 0
    checked_at: datetime | None = None


class CheckpointOut(BaseModel):
    size: int = Field(description="events in the log")
    root: str = Field(description="base64 RFC 9162 root hash")
    signed_at: datetime
    checkpoint: str = Field(description="the signed note (c2sp.org/tlog-checkpoint); keep it to pin the log")


class InclusionProofOut(BaseModel):
    event_id: int
    leaf_index: int
    tree_size: int
    leaf: str = Field(description="the event's canonical JSON: SHA-256(0x00 || leaf) is the leaf hash")
    leaf_hash: str = Field(description="base64")
    path: list[str] = Field(description="base64 hashes, RFC 9162 section 2.1.3")
    root: str = Field(description="base64 root of the checkpoint of tree_size")


class ConsistencyProofOut(BaseModel):
    old_size: int
    new_size: int
    path: list[str] = Field(description="base64 hashes, RFC 9162 section 2.1.4")
    old_root: str | None
    new_root: str


PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class ClinicIn(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, never silently dropped

    # what a name may hold, and its 200 characters, are judged in its one spelling: core.clinics.clinic_name
    name: str = Field(min_length=1, max_length=1000)


class ClinicOut(BaseModel):
    id: uuid.UUID
    name: str
    active: bool
    created_at: datetime
    deactivated_at: datetime | None


class KeyIn(BaseModel):
    # refused, never dropped: an auditor key asked with "clinic" for clinic_id would see every clinic
    model_config = ConfigDict(extra="forbid")

    role: Literal["clinic", "auditor", "admin"]
    clinic_id: uuid.UUID | None = Field(None, description="required for clinic keys; scopes an auditor to one clinic")
    label: str = Field("", max_length=200, pattern=PRINTABLE)


class KeyOut(BaseModel):
    id: uuid.UUID
    prefix: str
    role: str
    clinic_id: uuid.UUID | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="the secret API key: shown only in this response, store it now")
