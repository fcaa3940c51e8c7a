"""Auditor routes: search, export and verify the audit trail. Auditor queries are audited too.

Auditors see access records only: who touched which case, when, from where, with what outcome.
They never see images or classification results. An auditor key bound to a clinic sees only that
clinic's records; an unbound one sees everything.
Only auditor keys: the router checks the role before any route's parameters (:func:`api.role_checks.role_first`),
so another key gets the same audited 403 whatever it sends.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import re
import uuid
from collections.abc import Generator
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from api import fhir
from api.db import iterate_on_one_thread
from api.deps import AppState, AuthenticatedCaller, Caller, Db, State, limit
from api.params import ISO_8601, only, utc
from api.role_checks import role_first
from api.routes.cases import NO_STORE, PROBLEMS
from api.schemas import AuditEventOut, AuditPage, ChainReportOut
from core import audit, audit_resume, clinics, keys
from core.db import session_scope
from core.errors import BadRequest, Forbidden, InvalidInput, NotFound
from core.models import ApiKey, Role

log = logging.getLogger("dermq.api")

router = APIRouter(prefix="/v1/audit-events", tags=["audit"], dependencies=[role_first(Role.AUDITOR)])
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
#: the longest time range one export covers (pages of it are read in short transactions)
EXPORT_MAX_DAYS = 31
EXPORT_MAX_RANGE = timedelta(days=EXPORT_MAX_DAYS)


NOWHERE = uuid.UUID(int=0)  # matches no key: an unknown key prefix finds no records


def _printable(value: str, name: str) -> str:
    if not value.isprintable():
        raise InvalidInput(f"'{name}' must be printable text", code="invalid_filter")
    return value


def _clinic_id(session: Session, value: str | None, scoped: bool) -> uuid.UUID | None:
    """A clinic filter given as an id or a name (a scoped auditor's unknown name is out of scope)."""
    if value is None:
        return None
    _printable(value, "clinic")
    try:
        return clinics.get_clinic(session, value).id
    except NotFound:
        if scoped:
            return NOWHERE
        raise


def _actor_id(session: Session, value: str | None) -> uuid.UUID | None:
    """An actor filter given as a key id or a key prefix (``dq_0a1b2c3d4e5f`` or ``0a1b2c3d4e5f``)."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        pass
    prefix = _printable(value, "actor").removeprefix("dq_").split("_", 1)[0]
    found = session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix))
    return found or NOWHERE


def _filters(
    caller: Caller,
    session: Session,
    since: datetime | None,
    until: datetime | None,
    actor_value: str | None,
    clinic_value: str | None,
    case: uuid.UUID | None,
    action: str | None,
    outcome: str | None,
    *,
    audited_as: str = "audit.query",
    detail: dict[str, str] | None = None,
) -> audit.AuditFilter:
    """The filters of a query (or, ``audited_as`` ``audit.export`` with its ``detail``, an export); a
    clinic-scoped auditor's look at another clinic's records is refused and audited as that action."""
    scope = caller.principal.clinic_id
    clinic = _clinic_id(session, clinic_value, scope is not None)
    actor = _actor_id(session, actor_value)
    if scope is not None:
        if clinic is not None and clinic != scope:
            raise Forbidden(
                "this auditor key is limited to its own clinic's records",
                code="clinic_scope",
                audit=audit.PendingEvent(audited_as, audit.DENIED, detail={**(detail or {}), "reason": "clinic_scope"}),
            )
        clinic = scope
    if action is not None and action not in audit.ACTIONS:
        raise InvalidInput(
            f"unknown action {action!r}; the actions are: {', '.join(sorted(audit.ACTIONS))}", code="unknown_action"
        )
    since, until = utc(since, "since"), utc(until, "until")
    if since and until and since >= until:
        raise BadRequest("'since' must be before 'until'", code="invalid_time_range")
    return audit.AuditFilter(since, until, actor, clinic, case, action, outcome)


def record_auditor_access(
    session: Session,
    caller: Caller,
    action: str,
    detail: dict[str, Any],
    *,
    outcome: str = audit.SUCCESS,
    clinic_id: uuid.UUID | None = None,
) -> None:
    """Audit one auditor's use of the trail (filed under the auditor's clinic unless ``clinic_id`` says)."""
    audit.record(
        session,
        action=action,
        outcome=outcome,
        actor=caller.actor,
        entity_type="audit",
        clinic_id=clinic_id if clinic_id is not None else caller.principal.clinic_id,
        detail=detail,
    )


def _cursor(value: str | None) -> int | None:
    """The event id a ``next_cursor`` carries: decimal ASCII digits of a positive bigint and nothing
    else (``int()`` took ``-5``, ``0``, ``1_0`` and other scripts' digits, and a cursor of 0 or less
    answered an empty last page, as if the trail ended there)."""
    if value is None:
        return None
    if _CURSOR.fullmatch(value) is None:
        raise BadRequest("the cursor is not one dermq issued", code="invalid_cursor")
    return int(value)


_CURSOR = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)  # below the largest bigint


FILTERS = ("since", "until", "actor", "clinic", "case", "action", "outcome")
SEARCH_PARAMETERS = frozenset({*FILTERS, "cursor", "limit"})
EXPORT_PARAMETERS = frozenset({*FILTERS, "format"})


@router.get("", response_model=AuditPage, responses=PROBLEMS, summary="Search the audit trail, newest first")
async def search_events(
    request: Request,
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    since: Annotated[datetime | None, ISO_8601, Query(description="occurred at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, ISO_8601, Query(description="occurred before (ISO 8601)")] = None,
    actor: Annotated[
        str | None, Query(max_length=64, description="the API key that acted: its id or its prefix (dq_0a1b2c3d4e5f)")
    ] = None,
    clinic: Annotated[str | None, Query(max_length=200, description="clinic id or name")] = None,
    case: Annotated[uuid.UUID | None, Query(description="case id")] = None,
    action: Annotated[
        str | None, Query(max_length=64, pattern=r"^[a-z_.]+$", description="e.g. case.read, heatmap.read")
    ] = None,
    outcome: Annotated[Literal["success", "failure", "denied"] | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit_: Annotated[int, Query(alias="limit", ge=1, le=500)] = 100,
) -> AuditPage:
    only(request, SEARCH_PARAMETERS)

    def read(session: Session) -> AuditPage:
        limit(caller, app, "read")
        filters = _filters(caller, session, since, until, actor, clinic, case, action, outcome)
        page, next_id = audit.search(session, filters, before_id=_cursor(cursor), limit=limit_)
        record_auditor_access(session, caller, "audit.query", {"filters": filters.describe(), "count": len(page)})
        return AuditPage(
            items=[AuditEventOut(**audit.as_record(e)) for e in page],
            next_cursor=str(next_id) if next_id is not None else None,
        )

    out = await db.run(read)
    response.headers.update(NO_STORE)
    return out


def _csv_cell(value: object) -> str:
    text = "" if value is None else json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    # Spreadsheets execute cells that start like formulas; user agents are attacker-controlled.
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


class ExportInterrupted(Exception):
    """The caller's key stopped being valid while its export streamed: the response is cut short."""


def _key_still_valid(app: AppState, caller: Caller, filters: audit.AuditFilter) -> None:
    """Between two pages of an export: stop it, audited, once the caller's key was revoked (or its
    clinic deactivated) after the export began. The status line has gone out, so the connection is
    closed mid-body: the client sees a broken download, never a file that looks complete."""
    with session_scope(app.settings) as session:
        reason = keys.still_valid(session, caller.principal.key_id)
        if reason is None:
            return
        record_auditor_access(
            session, caller, "audit.export", {"filters": filters.describe(), "reason": reason, "stopped": True},
            outcome=audit.DENIED,
        )  # fmt: skip
    log.warning("audit export stopped: the caller's key is no longer valid", extra={"event": "export_stopped"})
    raise ExportInterrupted(reason)


def _export_rows(app: AppState, caller: Caller, filters: audit.AuditFilter, fmt: str) -> Generator[bytes]:
    """The export's body, a page at a time; each page's transaction has ended before it is sent, and
    the caller's key is checked again before every page after the first."""
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerow(audit.EXPORT_FIELDS)
        yield buffer.getvalue().encode()
    if fmt == "fhir":  # one Bundle (collection) of AuditEvents, written as a streamed JSON document
        yield json.dumps({"resourceType": "Bundle", "type": "collection"})[:-1].encode() + b', "entry": ['
    first = True
    for number, page in enumerate(audit.export_pages(lambda: session_scope(app.settings), filters)):
        if number:
            _key_still_valid(app, caller, filters)
        buffer = io.StringIO()
        if fmt == "fhir":
            for record in page:
                entry = {"fullUrl": f"urn:dermq:audit-event:{record['id']}", "resource": fhir.audit_event(record)}
                buffer.write(("" if first else ",\n") + json.dumps(entry, sort_keys=True))
                first = False
        elif fmt == "csv":
            writer = csv.writer(buffer)
            for record in page:
                writer.writerow([_csv_cell(record[f]) for f in audit.EXPORT_FIELDS])
        else:
            for record in page:
                buffer.write(json.dumps(record, sort_keys=True) + "\n")
        yield buffer.getvalue().encode()
    if fmt == "fhir":
        yield b"]}\n"


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        **PROBLEMS,
        200: {
            "content": {"application/x-ndjson": {}, "text/csv": {}, fhir.MEDIA_TYPE: {}},
            "description": "every matching event, newest first, streamed",
        },
    },
    summary="Export a bounded time range as NDJSON, CSV or a FHIR R4 Bundle of AuditEvents (streamed)",
)
async def export_events(
    request: Request,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    format: Annotated[Literal["ndjson", "csv", "fhir"], Query()] = "ndjson",
    since: Annotated[datetime | None, ISO_8601, Query(description="required: occurred at or after (ISO 8601)")] = None,
    until: Annotated[
        datetime | None, ISO_8601, Query(description=f"required: before; at most {EXPORT_MAX_DAYS} days on")
    ] = None,
    actor: Annotated[str | None, Query(max_length=64, description="key id or prefix")] = None,
    clinic: Annotated[str | None, Query(max_length=200, description="clinic id or name")] = None,
    case: Annotated[uuid.UUID | None, Query()] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_.]+$")] = None,
    outcome: Annotated[Literal["success", "failure", "denied"] | None, Query()] = None,
) -> StreamingResponse:
    only(request, EXPORT_PARAMETERS)  # a misspelt filter would otherwise export everything in the range

    def record(session: Session) -> audit.AuditFilter:
        limit(caller, app, "read")
        filters = _filters(
            caller,
            session,
            since,
            until,
            actor,
            clinic,
            case,
            action,
            outcome,
            audited_as="audit.export",
            detail={"format": format},
        )
        if filters.since is None or filters.until is None or filters.until - filters.since > EXPORT_MAX_RANGE:
            raise BadRequest(
                f"an export needs 'since' and 'until', at most {EXPORT_MAX_DAYS} days apart "
                "(export longer periods range by range)",
                code="invalid_time_range",
            )
        record_auditor_access(session, caller, "audit.export", {"filters": filters.describe(), "format": format})
        return filters

    # The export is audited, and the request's transaction commits, before the first row leaves.
    filters = await db.run(record)
    media, suffix = {
        "csv": ("text/csv; charset=utf-8", "csv"),
        "fhir": (fhir.MEDIA_TYPE, "fhir.json"),
    }.get(format, ("application/x-ndjson", "ndjson"))
    name = f"dermq-audit.{suffix}"
    return StreamingResponse(
        iterate_on_one_thread(lambda: _export_rows(app, caller, filters, format)),
        media_type=media,
        headers={**NO_STORE, "Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    "/verify",
    response_model=ChainReportOut,
    responses=PROBLEMS,
    summary="The latest verification of the audit log (done by the sealer's periodic check)",
)
async def verify_chain(response: Response, app: State, caller: AuthenticatedCaller, db: Db) -> ChainReportOut:
    """The result of the last periodic check (``dermq.audit_check``, every minute): every event sealed
    since the check before was recomputed and compared with the signed checkpoints. Nothing is walked
    per request; ``ok`` is null until the first check has run."""

    def read(session: Session) -> Row[Any] | None:
        limit(caller, app, "read")
        row = audit_resume.latest_verdict(session)
        record_auditor_access(
            session,
            caller,
            "audit.verify",
            {"ok": row.ok if row else None, "size": row.size if row else 0},
            outcome=audit.SUCCESS if row is None or row.ok else audit.FAILURE,
        )
        return row

    row = await db.run(read)
    response.headers.update(NO_STORE)
    if row is None:
        return ChainReportOut(ok=None, checked=0, first_bad_id=None, reason="not verified yet", last_hash=None)
    return ChainReportOut(
        ok=row.ok,
        checked=row.size if row.ok else (row.first_bad_seq or 0),
        first_bad_id=row.first_bad_event_id,
        first_bad_position=row.first_bad_seq,
        reason=row.reason,
        last_hash=base64.b64encode(bytes(row.root)).decode() if row.root is not None else None,
        tree_size=row.size,
        checked_at=row.checked_at,
    )
