"""``GET /v1/cases``: the clinic's cases, newest first (its own router, beside api.routes.cases). Only
clinic keys: the router checks the role before the parameters (:func:`api.role_checks.clinic_first`),
and another key's refusal is audited as ``case.list``, as the service's own check audits it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api.case_views import summary
from api.deps import AuthenticatedCaller, Db, State, limit
from api.params import ISO_8601, only, utc
from api.role_checks import clinic_first
from api.routes.cases import NO_STORE, PROBLEMS
from api.schemas import CasePage
from core import case_list, phi
from core.errors import BadRequest
from core.models import CaseStatus, Priority

router = APIRouter(prefix="/v1/cases", tags=["cases"], dependencies=[clinic_first("case.list")])
LIST_PARAMETERS = frozenset({"status", "priority", "since", "until", "cursor", "limit"})


@router.get("", response_model=CasePage, responses=PROBLEMS, summary="The clinic's cases, newest first")
async def list_cases(
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    request: Request,
    status: Annotated[CaseStatus | None, Query(description="only cases in this state")] = None,
    priority: Annotated[Priority | None, Query(description="only cases of this priority")] = None,
    since: Annotated[datetime | None, ISO_8601, Query(description="created at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, ISO_8601, Query(description="created before (ISO 8601)")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
    limit_: Annotated[int | None, Query(alias="limit", ge=1, le=200)] = None,
) -> CasePage:
    """The clinic's cases, newest first, with each finished one's outcome, label and referral flag."""
    only(request, LIST_PARAMETERS)

    created_from, created_before = utc(since, "since"), utc(until, "until")
    if created_from and created_before and created_from >= created_before:
        raise BadRequest("'since' must be before 'until'", code="invalid_time_range")

    def read(session: Session) -> CasePage:
        limit(caller, app, "read")
        page = case_list.list_cases(
            session,
            keyring=app.keyring,
            principal=caller.principal,
            actor=caller.actor,
            status=status,
            priority=priority,
            since=created_from,
            until=created_before,
            cursor=cursor,
            limit=min(limit_ or app.settings.page_size_default, app.settings.page_size_max),
        )
        refs = phi.client_refs(session, app.keyring, page.cases, skip_destroyed=True)  # as their results
        return CasePage(
            items=[summary(c, refs.get(c.id), page.results.get(c.id)) for c in page.cases],
            next_cursor=page.next_cursor,
        )

    out = await db.run(read, last=True)
    response.headers.update(NO_STORE)
    return out
