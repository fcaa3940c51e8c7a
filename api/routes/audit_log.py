"""Auditor routes of the Merkle log: the latest signed checkpoint, inclusion and consistency proofs.

An auditor pins a checkpoint (``GET /v1/audit/checkpoints/latest``), checks its signature with the
log's verifier key (handed over out of band, never fetched from here), and later asks for proofs:

- inclusion: this event is in the tree the checkpoint signs (RFC 9162 section 2.1.3);
- consistency: today's tree extends the pinned one, so nothing before it was removed or changed
  (RFC 9162 section 2.1.4).

Every request is audited. A clinic-scoped auditor gets inclusion proofs for its clinic's events only.
Only auditor keys: the router checks the role before any route's parameters (:func:`api.role_checks.role_first`),
so another key gets the same audited 403 whatever it sends.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api.deps import AuthenticatedCaller, Db, State, limit
from api.params import only
from api.role_checks import role_first
from api.routes.audit import record_auditor_access
from api.routes.cases import NO_STORE, PROBLEMS
from api.schemas import CheckpointOut, ConsistencyProofOut, InclusionProofOut
from core import audit, audit_log, checkpoint
from core.errors import BadRequest, Conflict, NotFound
from core.models import AuditEvent, Role

router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[role_first(Role.AUDITOR)])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


#: the answer when the stored log does not hold what its signed notes say (rows the owner's login
#: rewrote, say): nothing here can be proved until an operator has looked
INCONSISTENT = "the stored audit log does not match its signed checkpoint; an operator should run `dermq audit verify`"


def _latest(session: Session) -> audit_log.StoredCheckpoint:
    """The latest checkpoint, as its signed note says. Its row's size and root are the services'
    login's to write: a row holding an older genuine note beside a size of its choosing was served as
    the checkpoint, and the consistency proof's default size came from it."""
    latest = audit_log.latest_checkpoint(session)
    if latest is None:
        raise NotFound("no checkpoint yet: the sealer has not sealed any event", code="no_checkpoint")
    try:
        says = checkpoint.unverified(latest.note)
    except checkpoint.CheckpointError:
        raise Conflict(INCONSISTENT, code="log_inconsistent") from None
    if (says.size, says.root) != (latest.size, latest.root):
        raise Conflict(INCONSISTENT, code="log_inconsistent")
    return audit_log.StoredCheckpoint(says.size, says.root, says.time, latest.note)


@router.get(
    "/checkpoints/latest", response_model=CheckpointOut, responses=PROBLEMS, summary="The latest signed checkpoint"
)
async def latest_checkpoint(response: Response, app: State, caller: AuthenticatedCaller, db: Db) -> CheckpointOut:

    def read(session: Session) -> CheckpointOut:
        limit(caller, app, "read")
        latest = _latest(session)
        record_auditor_access(session, caller, "audit.checkpoint", {"size": latest.size})
        return CheckpointOut(
            size=latest.size, root=_b64(latest.root), signed_at=latest.signed_at, checkpoint=latest.note
        )

    out = await db.run(read)
    response.headers.update(NO_STORE)
    return out


@router.get(
    "/proofs/inclusion",
    response_model=InclusionProofOut,
    responses=PROBLEMS,
    summary="Prove that one event is in the log",
)
async def inclusion_proof(
    request: Request,
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    event: Annotated[int, Query(ge=1, description="the event id")],
    size: Annotated[int | None, Query(ge=1, description="tree size (default: the latest checkpoint's)")] = None,
) -> InclusionProofOut:
    only(request, {"event", "size"})  # a misspelt size would prove against another tree than the one asked

    def read(session: Session) -> InclusionProofOut:
        limit(caller, app, "read")
        latest = _latest(session)
        tree_size = size or latest.size
        if tree_size > latest.size:
            raise BadRequest(f"the log has {latest.size} sealed events; ask for a size up to that", code="invalid_size")
        row = session.get(AuditEvent, event)
        scope = caller.principal.clinic_id
        asked = {"kind": "inclusion", "event": event, "size": tree_size}
        if row is None or (scope is not None and row.clinic_id != scope):
            # a clinic's auditor walking other clinics' event ids leaves a trace, under both clinics
            raise NotFound(
                "no such event",
                code="not_found",
                audit=audit.PendingEvent(
                    "audit.proof",
                    audit.DENIED,
                    "audit",
                    detail=asked | {"reason": "not_found"},
                    also_clinic_id=row.clinic_id if row is not None else None,
                ),
            )
        try:
            index, leaf, path = audit_log.inclusion_proof(session, event, tree_size)
        except audit_log.NotSealed:
            raise NotFound(
                "the event is not sealed into a tree of that size yet",
                code="not_sealed",
                audit=audit.PendingEvent(
                    "audit.proof", audit.FAILURE, "audit", detail=asked | {"reason": "not_sealed"}
                ),
            ) from None
        except LookupError:  # the stored tree lacks a node under the signed checkpoint's size
            raise Conflict(INCONSISTENT, code="log_inconsistent") from None
        try:
            root = audit_log.StoredTree(session).root(tree_size)
        except LookupError:
            raise Conflict(INCONSISTENT, code="log_inconsistent") from None
        record_auditor_access(session, caller, "audit.proof", asked, clinic_id=scope)
        return InclusionProofOut(
            event_id=event,
            leaf_index=index,
            tree_size=tree_size,
            leaf=audit.leaf_bytes(row).decode(),
            leaf_hash=_b64(leaf),
            path=[_b64(h) for h in path],
            root=_b64(root),
        )

    out = await db.run(read)
    response.headers.update(NO_STORE)
    return out


@router.get(
    "/proofs/consistency",
    response_model=ConsistencyProofOut,
    responses=PROBLEMS,
    summary="Prove that the log of one size extends the log of a smaller size",
)
async def consistency_proof(
    request: Request,
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    old: Annotated[int, Query(alias="from", ge=0, description="the pinned tree size")],
    new: Annotated[int | None, Query(alias="to", ge=1, description="default: the latest checkpoint's")] = None,
) -> ConsistencyProofOut:
    only(request, {"from", "to"})

    def read(session: Session) -> ConsistencyProofOut:
        limit(caller, app, "read")
        latest = _latest(session)
        new_size = new or latest.size
        if not old <= new_size <= latest.size:
            raise BadRequest(f"need from <= to <= {latest.size} (the latest checkpoint's size)", code="invalid_size")
        tree = audit_log.StoredTree(session)
        try:
            path = audit_log.consistency_proof(session, old, new_size)
            old_root, new_root = (_b64(tree.root(old)) if old else None), _b64(tree.root(new_size))
        except LookupError:
            raise Conflict(INCONSISTENT, code="log_inconsistent") from None
        record_auditor_access(session, caller, "audit.proof", {"kind": "consistency", "from": old, "to": new_size})
        return ConsistencyProofOut(
            old_size=old, new_size=new_size, path=[_b64(h) for h in path], old_root=old_root, new_root=new_root
        )

    out = await db.run(read)
    response.headers.update(NO_STORE)
    return out
