"""Confirmed outcomes: a clinic reports a finished case's confirmed diagnosis (see :mod:`core.outcomes`).
Only clinic keys: the router checks the role before the path and body (:func:`api.role_checks.clinic_first`),
and another key's refusal is audited as ``case.outcome``, as the service's own check audits it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import JSON_BODY, NO_QUERY, AuthenticatedCaller, Db, State, limit
from api.role_checks import clinic_first
from api.routes.cases import JSON_PROBLEMS, NO_STORE, PROBLEMS
from core import outcomes

router = APIRouter(prefix="/v1/cases", tags=["cases"], dependencies=[clinic_first(outcomes.ACTION)])


class OutcomeIn(BaseModel):
    """No length limit here (the body's 64 KiB is one): a code dermq does not know, however long, is
    refused by :func:`core.outcomes.record_outcome` with ``unknown_diagnosis`` or ``unknown_method``,
    audited like the route's other refusals; a schema limit answered a plain 422 and wrote nothing."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: str = Field(description="the confirmed HAM10000 class: akiec, bcc, bkl, df, mel, nv, vasc")
    method: str = Field(description="how it was confirmed: histo, follow_up, consensus or confocal")


class OutcomeOut(BaseModel):
    case_id: uuid.UUID
    diagnosis: str
    method: Literal["histo", "follow_up", "consensus", "confocal"]
    revision: int = Field(description="1 for the first report; each correction adds one")
    created_at: datetime
    updated_at: datetime


@router.post(
    "/{case_id}/outcome",
    response_model=OutcomeOut,
    status_code=201,
    responses={
        **JSON_PROBLEMS,
        200: {
            "model": OutcomeOut,
            "description": "a correction (the earlier report is replaced), or the current report sent "
            "again (unchanged: no new revision)",
        },
        409: PROBLEMS[404] | {"description": "the case has not succeeded (yet)"},
        410: PROBLEMS[404] | {"description": "the case's result was erased"},
    },
    dependencies=[*JSON_BODY, *NO_QUERY],
    summary="Report a case's confirmed diagnosis (a different later report corrects it)",
)
async def report_outcome(
    case_id: uuid.UUID, body: OutcomeIn, response: Response, app: State, caller: AuthenticatedCaller, db: Db
) -> OutcomeOut:
    """One confirmed outcome per case, for field performance (`dermq monitor report`). Only for a case
    that has succeeded (410 `case_purged` once its result was erased); 422 `unknown_diagnosis` or
    `unknown_method` for codes dermq does not know.
    Audited as `case.outcome` (the method and revision, never the diagnosis)."""

    def record(session: Session) -> tuple[OutcomeOut, bool]:
        limit(caller, app, "submit")
        row, correction = outcomes.record_outcome(
            session,
            keyring=app.keyring,
            principal=caller.principal,
            actor=caller.actor,
            case_id=case_id,
            diagnosis=body.diagnosis,
            method=body.method,
        )
        out = OutcomeOut(
            case_id=row.case_id,
            diagnosis=body.diagnosis,  # validated; stored sealed, never read back here
            method=row.method,
            revision=row.revision,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        return out, correction

    out, correction = await db.run(record)
    if correction:
        response.status_code = 200
    response.headers.update(NO_STORE)
    return out
