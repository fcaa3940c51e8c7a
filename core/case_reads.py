"""A clinic's reads of one of its cases: the case with its result, its status for a long poll, and its
heat map. Every read that returns patient data is audited inside the reading transaction."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Dialect, and_, bindparam, select
from sqlalchemy.orm import Session, aliased

from core import audit, phi, prepared, results
from core.cases import owned, owned_case, require_clinic
from core.crypto import Keyring, SealedBlob, decrypt_blob
from core.errors import Conflict, Gone, NotFound
from core.keys import Principal
from core.models import BlobKind, Case, CaseBlob, CaseStatus, Outcome, Result, Role


@dataclass(frozen=True, slots=True)
class CaseRead:
    """What a clinic's read of one case returns: the case, its result (findings opened; None before it
    succeeded and once they are erased) and its client reference."""

    case: Case
    result: results.ResultView | None
    client_ref: str | None


def get_case(
    session: Session, *, keyring: Keyring, principal: Principal, actor: audit.Actor, case_id: uuid.UUID
) -> CaseRead:
    """The case with its result and client reference, read in one statement, and the read audited."""
    clinic_id = require_clinic(principal, "case.read", str(case_id))
    statement, execution = _read_statement(session.get_bind().dialect)
    prepared.ensure(session.connection(), statement)
    row = session.execute(execution, {"case_id": case_id}).one_or_none()
    case = owned(None if row is None else row.Case, clinic_id, "case.read", case_id)
    assert row is not None  # owned() refused a missing case
    result = None
    with phi.refused_if_destroyed("case.read", case_id):
        if case.status == CaseStatus.SUCCEEDED and row.Result is not None:
            result = results.open_result(keyring, row.Result, SealedBlob.from_row(row, "result_"))
        client_ref = phi.open_client_ref(keyring, case, SealedBlob.from_row(row, "ref_"))
    audit.record(
        session,
        action="case.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"status": case.status},
    )
    return CaseRead(case, result, client_ref)


def _blob_columns(blob: Any, prefix: str) -> list[Any]:
    return [getattr(blob, part).label(f"{prefix}_{part}") for part in ("ciphertext", "nonce", "wrapped_key", "kek_id")]


_RESULT_BLOB, _REF_BLOB = aliased(CaseBlob), aliased(CaseBlob)
_READ_COLUMNS = (Case, Result, *_blob_columns(_RESULT_BLOB, "result"), *_blob_columns(_REF_BLOB, "ref"))
#: a case, its result row, and its ``result`` and ``client_ref`` blobs: one round trip per read
_READ_CASE = (
    select(*_READ_COLUMNS)
    .outerjoin(Result, Result.case_id == Case.id)
    .outerjoin(_RESULT_BLOB, and_(_RESULT_BLOB.case_id == Case.id, _RESULT_BLOB.kind == BlobKind.RESULT.value))
    .outerjoin(_REF_BLOB, and_(_REF_BLOB.case_id == Case.id, _REF_BLOB.kind == BlobKind.CLIENT_REF.value))
    .where(Case.id == bindparam("case_id", type_=Case.__table__.c.id.type))
)


@functools.lru_cache(maxsize=4)
def _read_statement(dialect: Dialect) -> tuple[prepared.Prepared, Any]:
    """:data:`_READ_CASE` as a server-side prepared statement (:mod:`core.prepared`), built once per
    process and prepared once per connection, and its execution, loading the case and its result.
    Postgres parsed and planned the four-table join at every read: 0.44-0.46 ms of the backend's CPU
    a read against 0.12-0.14 prepared, on this project's 2-core VM (docs/PERFORMANCE.md). Every table
    is reached through its primary key or unique index, so the generic plan Postgres may keep after
    five reads is the same whatever the tables' size or statistics."""
    statement = prepared.prepare(_READ_CASE, dialect, [("case_id", "uuid")])
    execution = (
        select(*_READ_COLUMNS)
        .from_statement(statement.execute)
        # the case as it is now, also where this Session holds an older copy of it: a request that
        # created the case and waited for its end (``?wait=``) reads it in the same Session
        .execution_options(populate_existing=True)
    )
    return statement, execution


def peek_status(session: Session, *, principal: Principal, case_id: uuid.UUID) -> CaseStatus | None:
    """The case's status if ``principal`` (a clinic key) may read the case, else None. Not audited: it
    returns no patient data; a long poll ends with an audited read (:func:`get_case`)."""
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        return None
    status = session.scalar(select(Case.status).where(Case.id == case_id, Case.clinic_id == principal.clinic_id))
    return CaseStatus(status) if status is not None else None


def read_heatmap(
    session: Session, *, keyring: Keyring, principal: Principal, actor: audit.Actor, case_id: uuid.UUID
) -> bytes:
    """The decrypted Grad-CAM overlay PNG of a finished case."""
    case = owned_case(session, principal, case_id, "heatmap.read")

    def refused(reason: str) -> audit.PendingEvent:  # every answer is audited, the refusals too
        return audit.PendingEvent("heatmap.read", audit.FAILURE, "case", str(case_id), {"reason": reason})

    def erased() -> Gone:
        return Gone(
            "this case's images were erased (retention or deletion)", code="case_purged", audit=refused("purged")
        )

    if case.status == CaseStatus.PURGED:
        raise erased()
    if case.status == CaseStatus.FAILED:  # it never will have one: "not finished" would keep a client waiting
        raise Conflict(
            f"the case failed ({case.failure_code}) and has no heat map; submit the image again",
            code="case_failed",
            audit=refused("failed"),
        )
    if case.status != CaseStatus.SUCCEEDED:
        raise Conflict(
            f"the case is {case.status}; a heat map exists only once it has succeeded",
            code="case_not_finished",
            audit=refused("not_finished"),
        )
    blob = session.scalar(select(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == BlobKind.HEATMAP.value))
    if blob is None:
        session.refresh(case)  # erased since the case was read (its blobs with it): the case says so now
        if case.status == CaseStatus.PURGED:
            raise erased()
        result = session.get(Result, case_id)
        out_of_distribution = result is not None and result.outcome == Outcome.OUT_OF_DISTRIBUTION
        raise NotFound(
            "this case has no heat map: the image is out of distribution, so no diagnosis was made and there is "
            "nothing to explain (see result.outcome)"
            if out_of_distribution
            else "this case has no heat map (Grad-CAM ran out of time or failed; see gradcam_status)",
            code="heatmap_unavailable",
            audit=refused("out_of_distribution" if out_of_distribution else "unavailable"),
        )
    with phi.refused_if_destroyed("heatmap.read", case_id):
        png = decrypt_blob(keyring, blob.sealed, case_id=case_id, kind=BlobKind.HEATMAP.value)
    audit.record(
        session,
        action="heatmap.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
    )
    return png
