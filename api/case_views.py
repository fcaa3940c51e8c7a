"""How cases and results are shown to clinics: the API's JSON for a case, a list row and a result."""

from __future__ import annotations

from api.schemas import (
    CaseLinks,
    CaseOut,
    CaseSummary,
    DiagnosisOut,
    FailureOut,
    ImageOut,
    ModelRef,
    OutOfDistributionOut,
    label_name,
)
from core.models import Case, CaseStatus, Outcome
from core.results import ResultView
from ml.labels import CLASSES


def links(case: Case, *, heatmap: bool = True) -> CaseLinks:
    """The case's own URL, and its heat map's where one was stored (not out of distribution, not a
    heat map that ran out of time or failed, a result that can be opened)."""
    base = f"/v1/cases/{case.id}"
    has_heatmap = heatmap and case.status == CaseStatus.SUCCEEDED
    return CaseLinks(self=base, heatmap=f"{base}/heatmap.png" if has_heatmap else None)


#: what each out-of-distribution reason means, in words for the clinician (first known reason wins)
OOD_HINTS = {
    "blank": "it is blank or almost uniform",
    "noise": "it is mostly noise",
    "colour": "its colours are unlike skin seen through a dermatoscope",
    "energy": "the model recognises nothing in it that it was trained on",
    "feature_distance": "it is unlike the skin lesions the model was trained on",
}


def out_of_distribution_message(reasons: list[str]) -> str:
    hint = next((OOD_HINTS[r] for r in reasons if r in OOD_HINTS), None)
    return (
        "The image does not look like a dermoscopy image of a skin lesion"
        + (f" ({hint})" if hint else "")
        + "; no diagnosis was made. Retake the image with a dermatoscope and submit it as a new case."
    )


def result_out(result: ResultView) -> DiagnosisOut | OutOfDistributionOut:
    """A stored result as the API shows it: a diagnosis, or out of distribution without the model's raw answer."""
    model = ModelRef(id=result.model_id, weights_sha256=result.weights_sha256)
    if result.outcome == Outcome.OUT_OF_DISTRIBUTION:
        return OutOfDistributionOut(
            outcome="out_of_distribution",
            ood_reasons=result.ood_reasons,
            message=out_of_distribution_message(result.ood_reasons),
            gradcam_status="not_applicable",
            model=model,
            device=result.device,
            timings=result.timings,
            created_at=result.created_at,
        )
    # a diagnosis has all of these (the worker stores them together; the plain rows' CHECK constraint too)
    assert result.label is not None and result.probabilities is not None
    assert result.confidence is not None and result.uncertainty is not None and result.referral is not None
    return DiagnosisOut(
        outcome="diagnosis",
        label=result.label,
        label_name=label_name(result.label),
        probabilities={c: result.probabilities[c] for c in CLASSES if c in result.probabilities},
        confidence=result.confidence,
        uncertainty=result.uncertainty,
        referral=result.referral,
        referral_reasons=result.referral_reasons,
        gradcam_status=result.gradcam_status,
        model=model,
        device=result.device,
        timings=result.timings,
        created_at=result.created_at,
    )


def case_out(case: Case, result: ResultView | None, client_ref: str | None) -> CaseOut:
    purged = case.status == CaseStatus.PURGED
    return CaseOut(
        id=case.id,
        status=case.status,  # the column's CHECK constraint holds the Literal
        priority=case.priority,
        client_ref=client_ref,
        attempts=case.attempts,
        image=None
        if purged
        else ImageOut(
            format=case.image_format, width=case.image_width, height=case.image_height, bytes=case.image_bytes
        ),
        created_at=case.created_at,
        updated_at=case.updated_at,
        started_at=case.started_at,
        finished_at=case.finished_at,
        result=None if result is None else result_out(result),
        failure=FailureOut(code=case.failure_code, message=case.failure_message or "")
        if case.status == CaseStatus.FAILED and case.failure_code
        else None,
        links=links(case, heatmap=result is not None and result.gradcam_status == "ok"),
    )


def summary(
    case: Case, client_ref: str | None, result: tuple[str, str | None, bool | None, bool] | None = None
) -> CaseSummary:
    """A list row; ``result`` is the case's (outcome, label, referral, heat map stored) once it has
    one (none: not finished, or its result cannot be opened)."""
    outcome, label, referral, heatmap = result if result is not None else (None, None, None, False)
    return CaseSummary(
        id=case.id,
        status=case.status,  # the column's CHECK constraint holds the Literal
        priority=case.priority,
        client_ref=client_ref,
        outcome=outcome,  # the column's CHECK constraint holds the Literal
        label=label,
        referral=referral,
        created_at=case.created_at,
        updated_at=case.updated_at,
        links=links(case, heatmap=heatmap),
    )
