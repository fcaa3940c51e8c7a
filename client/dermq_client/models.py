"""The API's JSON as dataclasses: a case, its result (a diagnosis, or an image the model cannot judge),
a list row, and a completion notice. Each keeps the JSON it came from in ``raw``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "purged"})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass(frozen=True)
class ModelRef:
    id: str
    weights_sha256: str


@dataclass(frozen=True)
class Diagnosis:
    """The model judged the image: calibrated probabilities of the seven classes, label and referral."""

    label: str
    label_name: str
    probabilities: dict[str, float]
    confidence: float
    uncertainty: float
    referral: bool
    referral_reasons: list[str]
    gradcam_status: str
    model: ModelRef
    device: str
    timings: dict[str, float]
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    outcome: str = "diagnosis"


@dataclass(frozen=True)
class OutOfDistribution:
    """The image is not one the model can judge: no diagnosis, no heat map. Show ``message`` and ask
    for a new image. The diagnosis fields are ``None`` so that code reading them does not break."""

    ood_reasons: list[str]
    message: str
    gradcam_status: str
    model: ModelRef
    device: str
    timings: dict[str, float]
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    outcome: str = "out_of_distribution"
    label: None = None
    label_name: None = None
    probabilities: None = None
    confidence: None = None
    uncertainty: None = None
    referral: None = None
    referral_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    code: str
    message: str


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    bytes: int


@dataclass(frozen=True)
class Case:
    """A case: one image, its state and, once succeeded, its result."""

    id: str
    status: str
    priority: str
    client_ref: str | None = field(repr=False)  # the clinic's own reference (an MRN): not into logs by a repr
    attempts: int
    image: ImageInfo | None
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: Diagnosis | OutOfDistribution | None
    failure: Failure | None
    links: dict[str, str | None]
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: True when the server answered a submission with an existing case (same ``Idempotency-Key``)
    replayed: bool = False

    @property
    def terminal(self) -> bool:
        """The case has ended (``succeeded``, ``failed`` or ``purged``): it changes no more."""
        return self.status in TERMINAL


@dataclass(frozen=True)
class CaseSummary:
    """A row of ``GET /v1/cases``: a finished case's ``outcome`` (``diagnosis`` or
    ``out_of_distribution``), ``label`` and ``referral`` flag, enough for a worklist; ``get`` the case
    for its whole result (probabilities, reasons, heat map)."""

    id: str
    status: str
    priority: str
    client_ref: str | None = field(repr=False)  # the clinic's own reference (an MRN): not into logs by a repr
    created_at: datetime | None
    updated_at: datetime | None
    links: dict[str, str | None]
    raw: dict[str, Any] = field(repr=False, compare=False)
    outcome: str | None = None
    label: str | None = None
    referral: bool | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class CallbackNotice:
    """A verified completion callback: fetch the result with ``get(notice.case_id)``."""

    type: str
    case_id: str
    status: str
    outcome: str | None
    timestamp: datetime | None
    event_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


def parse_result(data: dict[str, Any] | None) -> Diagnosis | OutOfDistribution | None:
    if not data:
        return None
    model = data.get("model") or {}
    common: dict[str, Any] = {
        "gradcam_status": data.get("gradcam_status", ""),
        "model": ModelRef(id=model.get("id", ""), weights_sha256=model.get("weights_sha256", "")),
        "device": data.get("device", ""),
        "timings": dict(data.get("timings") or {}),
        "created_at": _time(data.get("created_at")),
        "raw": data,
    }
    if data.get("outcome") == "out_of_distribution":
        return OutOfDistribution(
            ood_reasons=list(data.get("ood_reasons") or []), message=data.get("message", ""), **common
        )
    return Diagnosis(
        label=data["label"],
        label_name=data.get("label_name", data["label"]),
        probabilities={k: float(v) for k, v in data["probabilities"].items()},
        confidence=float(data["confidence"]),
        uncertainty=float(data["uncertainty"]),
        referral=bool(data["referral"]),
        referral_reasons=list(data.get("referral_reasons") or []),
        **common,
    )


def parse_case(data: dict[str, Any], *, replayed: bool = False) -> Case:
    image = data.get("image")
    failure = data.get("failure")
    return Case(
        id=str(data["id"]),
        status=data["status"],
        priority=data.get("priority", "routine"),
        client_ref=data.get("client_ref"),
        attempts=int(data.get("attempts", 0)),
        image=ImageInfo(**{k: image[k] for k in ("format", "width", "height", "bytes")}) if image else None,
        created_at=_time(data.get("created_at")),
        updated_at=_time(data.get("updated_at")),
        started_at=_time(data.get("started_at")),
        finished_at=_time(data.get("finished_at")),
        result=parse_result(data.get("result")),
        failure=Failure(code=failure["code"], message=failure.get("message", "")) if failure else None,
        links=dict(data.get("links") or {}),
        raw=data,
        replayed=replayed,
    )


def parse_summary(data: dict[str, Any]) -> CaseSummary:
    return CaseSummary(
        id=str(data["id"]),
        status=data["status"],
        priority=data.get("priority", "routine"),
        client_ref=data.get("client_ref"),
        created_at=_time(data.get("created_at")),
        updated_at=_time(data.get("updated_at")),
        links=dict(data.get("links") or {}),
        raw=data,
        outcome=data.get("outcome"),
        label=data.get("label"),
        referral=None if data.get("referral") is None else bool(data["referral"]),
    )
