"""A clinic's list of its cases: filters, newest first, and a cursor that pages through them."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core import audit, results
from core.cases import require_clinic
from core.crypto import Keyring
from core.errors import BadRequest
from core.keys import Principal
from core.models import Case, CaseStatus, Outcome, Priority


@dataclass(frozen=True, slots=True)
class Page:
    cases: list[Case]
    next_cursor: str | None
    #: each succeeded case's (outcome, label, referral, whether it has a heat map), opened in one query: a
    #: worklist needs no read per case
    results: dict[uuid.UUID, tuple[str, str | None, bool | None, bool]] = field(default_factory=dict)

    @property
    def out_of_distribution(self) -> frozenset[uuid.UUID]:
        """Cases of the page whose result is out of distribution (no diagnosis, no heat map)."""
        return frozenset(i for i, (outcome, *_) in self.results.items() if outcome == Outcome.OUT_OF_DISTRIBUTION)


def _encode_cursor(case: Case) -> str:
    raw = json.dumps([case.created_at.isoformat(), str(case.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, case_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if when.utcoffset() != timedelta(0):  # dermq's are in UTC; Postgres refuses offsets past 15:59
            raise ValueError("not a cursor dermq issued")
        return when, uuid.UUID(case_id)
    except (ValueError, TypeError, AttributeError, binascii.Error, json.JSONDecodeError):  # UUID(5): AttributeError
        raise BadRequest("the cursor is not one dermq issued; start again without it", code="invalid_cursor") from None


def list_cases(
    session: Session,
    *,
    keyring: Keyring,
    principal: Principal,
    actor: audit.Actor,
    status: CaseStatus | None = None,
    priority: Priority | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> Page:
    """The clinic's own cases, newest first, ``limit`` at a time; optionally only those in a state, of
    a priority, or created in [``since``, ``until``)."""
    clinic_id = require_clinic(principal, "case.list")
    query = select(Case).where(Case.clinic_id == clinic_id)
    if status is not None:
        query = query.where(Case.status == status.value)
    if priority is not None:
        query = query.where(Case.priority == priority.value)
    if since is not None:
        query = query.where(Case.created_at >= since)
    if until is not None:
        query = query.where(Case.created_at < until)
    if cursor is not None:  # an empty one too: refused, never read as "from the start"
        created, case_id = _decode_cursor(cursor)
        query = query.where(or_(Case.created_at < created, and_(Case.created_at == created, Case.id < case_id)))
    rows = list(session.scalars(query.order_by(Case.created_at.desc(), Case.id.desc()).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    # a case sealed under a destroyed period key (a restore: docs/OPERATIONS.md) is listed without its
    # result, not the whole page refused; reading it alone says why (410 period_key_destroyed)
    succeeded = [c.id for c in page if c.status == CaseStatus.SUCCEEDED]
    opened = results.read_results(session, keyring, succeeded, skip_destroyed=True)
    shown = {case_id: (r.outcome, r.label, r.referral, r.gradcam_status == "ok") for case_id, r in opened.items()}
    # a succeeded case whose findings did not open was erased since the page was read (or is sealed under a
    # destroyed key): listed as it is now, not as a case that succeeded without a result
    if unopened := [case_id for case_id in succeeded if case_id not in opened]:
        session.scalars(select(Case).where(Case.id.in_(unopened)).execution_options(populate_existing=True)).all()
    audit.record(
        session,
        action="case.list",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        clinic_id=clinic_id,
        # the ids shown (with their client references): "who saw case X" finds list views too
        detail={
            "count": len(page),
            "status": status.value if status else None,
            "priority": priority.value if priority else None,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "ids": [str(c.id) for c in page],
        },
    )
    return Page(page, _encode_cursor(page[-1]) if more and page else None, shown)
