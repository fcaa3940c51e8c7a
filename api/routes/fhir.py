"""FHIR R4 views of a case: ``GET /v1/cases/{id}/fhir`` (a Bundle; see :mod:`api.fhir`). Only clinic
keys: the router checks the role before the parameters (:func:`api.role_checks.clinic_first`), and
another key's refusal is audited as a FHIR ``case.read``, as :func:`fhir_view`'s own check audits it."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from api import fhir
from api.deps import AuthenticatedCaller, Db, State, limit
from api.role_checks import clinic_first
from api.routes.cases import NO_STORE, PROBLEMS
from core import audit, phi, results
from core.cases import owned_case
from core.crypto import Keyring
from core.errors import Conflict, DermqError, Gone
from core.models import CaseStatus

router = APIRouter(prefix="/v1/cases", tags=["cases"], dependencies=[clinic_first("case.read", format="fhir")])


@contextmanager
def _filed_as_fhir() -> Iterator[None]:
    """A refused read (another clinic's case, unknown) is audited as a FHIR read too, as every other
    answer of this route: an auditor tells a FHIR probe from a JSON one. (A key of another role is
    refused before, by the router's ``clinic_first``, with the same ``format``; the service's own
    check stays as a second line.)"""
    try:
        yield
    except DermqError as exc:
        if isinstance(exc.audit, audit.PendingEvent):
            exc.audit = dataclasses.replace(exc.audit, detail={**exc.audit.detail, "format": "fhir"})
        raise


def fhir_view(session: Session, keyring: Keyring, caller: Any, case_id: uuid.UUID) -> dict[str, Any]:
    """The case's Bundle; the read is audited as ``case.read`` with ``{"format": "fhir"}``."""
    with _filed_as_fhir():
        case = owned_case(session, caller.principal, case_id, "case.read")
    with phi.refused_if_destroyed("case.read", case_id, format="fhir"):
        result = results.read_result(session, keyring, case_id) if case.status == CaseStatus.SUCCEEDED else None
    if case.status == CaseStatus.SUCCEEDED and result is None:
        session.refresh(case)  # erased between the two reads: the case says so now
    if case.status == CaseStatus.PURGED:
        raise Gone(
            "this case's result was erased with its images (retention or deletion)",
            code="case_purged",
            audit=audit.PendingEvent(
                "case.read", audit.FAILURE, "case", str(case_id), {"format": "fhir", "reason": "purged"}
            ),
        )
    if case.status == CaseStatus.FAILED:  # it never will have a report: "not finished" kept clients polling
        raise Conflict(
            f"the case failed ({case.failure_code}) and has no report; submit the image again",
            code="case_failed",
            audit=audit.PendingEvent(
                "case.read", audit.FAILURE, "case", str(case_id), {"format": "fhir", "reason": "failed"}
            ),
        )
    if result is None:
        raise Conflict(
            f"the case is {case.status}; a FHIR report exists only once it has succeeded",
            code="case_not_finished",
            audit=audit.PendingEvent(
                "case.read", audit.FAILURE, "case", str(case_id), {"format": "fhir", "reason": "not_finished"}
            ),
        )
    audit.record(
        session,
        action="case.read",
        outcome=audit.SUCCESS,
        actor=caller.actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"status": case.status, "format": "fhir"},
    )
    return fhir.case_bundle(case, result, now=datetime.now(UTC))


@router.get(
    "/{case_id}/fhir",
    response_class=Response,
    responses={
        **PROBLEMS,
        200: {
            "content": {fhir.MEDIA_TYPE: {}},
            "description": "a FHIR R4 Bundle (collection): DiagnosticReport, Observations and the model as Device",
        },
        409: PROBLEMS[404] | {"description": "the case has not succeeded (yet)"},
        410: PROBLEMS[404] | {"description": "the case's result was erased"},
    },
    summary="The case's result as a FHIR R4 Bundle",
)
async def read_case_fhir(case_id: uuid.UUID, app: State, caller: AuthenticatedCaller, db: Db) -> Response:
    """A DiagnosticReport (final once the case succeeded) with Observations for the label (SNOMED CT
    where known), each class probability, the uncertainty and the referral flag, all referencing the
    model (id and weights digest) as a Device. An out-of-distribution image's report has no diagnosis,
    and its conclusion says why. Audited as `case.read` with detail `{"format": "fhir"}`."""

    def read(session: Session) -> dict[str, Any]:
        limit(caller, app, "read")
        return fhir_view(session, app.keyring, caller, case_id)

    bundle = await db.run(read)
    return Response(json.dumps(bundle), media_type=fhir.MEDIA_TYPE, headers=NO_STORE)
