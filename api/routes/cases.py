"""Case routes for clinic portals: submit, poll, list, fetch the heat map, erase.

Only clinic keys: each route checks the role before its parameters, with its first dependency
(:mod:`api.role_checks`), so another key gets the same audited 403 whatever it sends, filed under the
route's action as the services' own check files it (``case.read``...; a submission: ``access.denied``).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from api import metrics, problems
from api.case_views import case_out
from api.db import RequestDb
from api.deps import NO_QUERY, AppState, AuthenticatedCaller, Caller, Db, State, limit
from api.intake_limits import BodyAllowance
from api.params import only
from api.role_checks import clinic_first, role_first
from api.schemas import (
    CaseOut,
    Problem,
)
from api.upload import UPLOAD_SCHEMA, declared_length, read_case_form, refuse_declared, validated_fields
from api.waiters import MAX_WAIT_SECONDS, wait_for_end
from core import audit, case_reads, cases, keys, phi, results, retention
from core.db import commit_durably, commit_without_flush
from core.enqueue import enqueue
from core.errors import DermqError, InvalidImageError, InvalidInput, ServiceUnavailable, Unauthorized
from core.models import Case, CaseStatus, Role
from core.publisher import classify_task
from ml import working_copy
from ml.images import ImageHeader, ImageLimits, InvalidImage

log = logging.getLogger("dermq.api")
router = APIRouter(prefix="/v1/cases", tags=["cases"])
WaitSeconds = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_SECONDS,
        description=f"seconds to wait for the case to end before answering (long poll; at most {MAX_WAIT_SECONDS:g})",
    ),
]

NO_STORE = {"Cache-Control": "no-store"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": text, "content": {"application/problem+json": {}}}
    for status, text in {
        400: "malformed request",
        401: "missing, malformed or revoked API key",
        403: "wrong role for this operation",
        404: "no such case (or clinic, or key) for this caller",
        422: "a parameter or body field is invalid (see errors)",
        429: "rate limit reached (see Retry-After)",
        503: "a dependency is down (see Retry-After)",
    }.items()
}

#: for a route that takes a JSON body (with ``dependencies=JSON_BODY``)
JSON_PROBLEMS = PROBLEMS | {415: PROBLEMS[400] | {"description": "the body was not sent as application/json"}}


@contextmanager
def _image_refusals() -> Iterator[None]:
    """An upload's :class:`InvalidImage` as its problem answer (422 or 413), counted by its code."""
    try:
        yield
    except InvalidImage as exc:
        metrics.UPLOAD_REJECTIONS.labels(exc.code).inc()
        raise InvalidImageError(exc.code, exc.message) from None


@router.post(
    "",
    status_code=202,
    response_model=CaseOut,
    summary="Submit a case (one dermoscopy image)",
    openapi_extra=UPLOAD_SCHEMA,
    dependencies=[role_first(Role.CLINIC)],
    responses={
        **PROBLEMS,
        200: {
            "model": CaseOut,
            "description": "replay of an earlier submission with the same Idempotency-Key and image",
        },
        201: {
            "model": CaseOut,
            "description": "with ?wait=S: the case was stored and ended within S seconds (its Location is the case)",
        },
        409: PROBLEMS[404] | {"description": "Idempotency-Key reused with a different image"},
        410: PROBLEMS[404] | {"description": "the case sent before with this Idempotency-Key was erased"},
        413: PROBLEMS[404] | {"description": "body or image over the size limit"},
        415: PROBLEMS[404] | {"description": "not multipart, or not an accepted image format"},
        422: PROBLEMS[404] | {"description": "invalid image (see code) or form field"},
    },
)
async def submit_case(
    request: Request,
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    wait: WaitSeconds = 0,
) -> CaseOut:
    """Validate, encrypt and queue one image. Answers 202 with the case and its `Location`; poll
    `GET /v1/cases/{id}` until `status` is `succeeded` or `failed`."""
    # ?priority=urgent would otherwise queue a routine case without a word
    only(request, {"wait"}, "; the case's 'priority' and 'client_ref' are form fields of the body, beside 'image'")
    if len(request.headers.getlist("idempotency-key")) > 1:  # all but the first would be dropped unseen
        raise InvalidInput("send one Idempotency-Key header", code="invalid_idempotency_key")
    # before the rate is charged: a refusal costs none
    refuse_declared(request, app.settings.max_upload_bytes)
    # the slot is taken before the rate is charged, with no await in between: of uploads sent at once,
    # those turned away for the clinic's uploads in progress are charged nothing either
    with ExitStack() as slot:
        body = slot.enter_context(app.uploads.hold(caller.principal.clinic_id, declared_length(request)))
        await db.run(lambda _: limit(caller, app, "submit"))
        # the upload's bytes and pixels are _accept's locals: a waiting submission keeps none of them
        out, created = await _accept(request, app, caller, db, idempotency_key, wait, (slot, body))
    if wait and not CaseStatus(out.status).terminal:  # a replay of an unfinished case waits too
        out = await _wait_and_read(request, db, app, caller, out, wait, created)
    if created and CaseStatus(out.status).terminal:
        response.status_code = 201  # finished within `wait`: the answer holds the result
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/cases/{out.id}"
    response.headers.update(NO_STORE)
    return out


async def _wait_and_read(
    request: Request, db: RequestDb, app: AppState, caller: Caller, out: CaseOut, wait: float, created: bool
) -> CaseOut:
    """The case once it has ended or ``wait`` has passed. The case (or the replay's audit event) is kept
    and its task sent once the wait's ticket is taken: a new case cannot end unheard, so its wait needs
    no first look. That commit does not wait for the disk: the read's durable commit flushes it. Once
    it is through, a database too busy for the wait's look or its read (no connection or lane in time,
    a lock or statement timeout) answers with the case as stored, its ``Location`` to poll, after a
    commit that waits for the disk (a 503 saying that nothing was stored had a portal without an
    Idempotency-Key send the image again as a second case; a 202 on the first commit alone could be
    lost in a crash). A database gone meanwhile (a restart, a failover), or failing otherwise, is
    answered the same way: the case is stored and its task sent. Too busy for that commit too, gone or
    failing, it answers 503 with the case's id and ``Location``, never "nothing was stored"."""
    committed = False

    async def commit() -> None:
        nonlocal committed
        await db.release()
        committed = True

    try:
        await wait_for_end(
            db, app.waiters, caller.principal, out.id, wait, commit=commit, created=created, receive=request.receive
        )
        return await db.run(lambda session: _read_after_wait(session, app, caller, out.id), last=True)
    except (ServiceUnavailable, PoolTimeout, DBAPIError) as exc:
        if not committed:
            raise
        log.warning(
            "a waiting submission's case is stored; the database failed its wait, answered as stored once on disk",
            extra={"event": "wait_unavailable", "error": type(exc).__name__, "code": problems.stored_case_failure(exc)},
        )
    try:
        stored = await db.run(lambda session: cases.confirm_stored(session, out.id), last=True)
    except (ServiceUnavailable, PoolTimeout, DBAPIError) as exc:
        code = problems.stored_case_failure(exc)
        # the case's id and Location, as a 202 gives them: a portal without an Idempotency-Key polls it
        # rather than sending the image again as a second case
        raise ServiceUnavailable(
            problems.unconfirmed_detail(code),
            code=code,
            retry_after=1 if code == "database_busy" else 5,
            headers={"Location": f"/v1/cases/{out.id}"},
            extra={"case_id": str(out.id)},
        ) from None
    if not stored:  # lost with a database crash before its commit reached the disk
        raise ServiceUnavailable("the case could not be stored; send it again", retry_after=1)
    return out


async def _accept(
    request: Request,
    app: AppState,
    caller: Caller,
    db: RequestDb,
    idempotency_key: str | None,
    wait: float,
    held: tuple[ExitStack, BodyAllowance],
) -> tuple[CaseOut, bool]:
    """Read, validate and store the upload and queue its case (or find the case an idempotency key
    names): the case as it is, and whether this request created it. Without ``wait`` the request's
    transaction has committed; with it, the commit is left to the wait. ``held``: the clinic's upload
    slot the request holds (given back here once the upload is decoded) and its body's allowance."""
    settings = app.settings
    slot, body = held
    with slot:
        try:
            form = await read_case_form(
                request,
                max_image_bytes=settings.max_upload_bytes,
                idle_timeout=settings.upload_idle_timeout_seconds,
                timeout=settings.upload_timeout_seconds,
                reserve=body.reserve,
            )
        except DermqError as exc:
            metrics.UPLOAD_REJECTIONS.labels(exc.code).inc()
            raise
        client_ref, priority = validated_fields(form.fields, idempotency_key, settings.max_client_ref_length)
        limits = ImageLimits.from_settings(settings)
        data = form.image

        def store(header: ImageHeader, session: Session) -> tuple[Case, bool]:
            """The case and its original, stored from what the header declares (a camera image's while
            its pixels decode)."""
            if wait:  # the answer comes after the durable commit of the audited read that ends the wait; said
                commit_without_flush(session)  # now, it goes with the intake's first statement (core.deferred)
            image = cases.NewImage(
                data, header.format, header.media_type, header.width, header.height, hashlib.sha256(data).hexdigest()
            )
            # an upload may take minutes to arrive: the INSERT checks the key again, in the same statement
            with _refused_after("upload"):
                return cases.create_case(
                    session,
                    keyring=app.keyring,
                    principal=caller.principal,
                    actor=caller.actor,
                    image=image,
                    client_ref=client_ref,
                    priority=priority,
                    idempotency_key=idempotency_key,
                )

        with _image_refusals():
            # Draft mode: validation needs a full read, not full resolution; the worker needs the
            # overlay's size, which a large upload's working copy keeps so it is decoded only here.
            # The transaction commits only after the decode has validated the upload.
            _, working, (case, created) = await app.decoder.decode_upload(
                data,
                limits,
                working_side=settings.overlay_max_side,
                alongside=lambda header: db.run(partial(store, header)),
            )
    metrics.UPLOAD_BYTES.observe(len(data))

    def create(session: Session) -> CaseOut:
        if created:  # sent once the request's transaction commits: a worker never looks for a row not yet there
            if working is not None:
                copy = cases.WorkingCopy(working, working_copy.MEDIA_TYPE)
                cases.add_working_copy(session, keyring=app.keyring, case=case, copy=copy)
            enqueue(session, app.publisher, classify_task(case.id, priority))
        elif wait:  # a replay of a finished case is answered from this transaction: its audit event waits for the disk
            commit_durably(session)
        with phi.refused_if_destroyed("case.create", case.id):  # as the replay's other refusals (core.cases)
            result = results.read_result(session, app.keyring, case.id) if case.status == CaseStatus.SUCCEEDED else None
            ref = client_ref if created else phi.client_refs(session, app.keyring, [case])[case.id]
        return case_out(case, result, ref)

    return await db.run(create, last=not wait), created


@router.get(
    "/{case_id}",
    response_model=CaseOut,
    responses=PROBLEMS,
    dependencies=[clinic_first("case.read")],
    summary="Poll a case",
)
async def read_case(
    case_id: uuid.UUID,
    request: Request,
    response: Response,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    wait: WaitSeconds = 0,
) -> CaseOut:
    """Status, timestamps and, once succeeded, the calibrated result; or the failure's code and message.
    With `wait`, the answer comes as soon as the case has ended, or after `wait` seconds."""
    only(request, {"wait"})  # a misspelt `wait` would otherwise answer at once

    def read(session: Session) -> CaseOut:
        limit(caller, app, "read")
        return _read(session, app, caller, case_id)

    if wait:
        await db.run(lambda _: limit(caller, app, "read"))  # counted before waiting, once
        await wait_for_end(db, app.waiters, caller.principal, case_id, wait, receive=request.receive)
        out = await db.run(lambda session: _read_after_wait(session, app, caller, case_id), last=True)
    else:
        out = await db.run(read, last=True)
    response.headers.update(NO_STORE)
    return out


def _read_after_wait(session: Session, app: AppState, caller: Caller, case_id: uuid.UUID) -> CaseOut:
    """:func:`_read` at the end of a long poll: refused, audited, if the caller's key was revoked (or its
    clinic deactivated) while the request waited."""
    _still_valid(session, app, caller, "wait")
    return _read(session, app, caller, case_id)


def _still_valid(session: Session, app: AppState, caller: Caller, after: str) -> None:
    """Refuse, audited, a request whose key was revoked (or its clinic deactivated) since it was
    authenticated, ``after`` a long poll. The database is asked only when a key change was announced, or
    may have been missed, since then. (A slow upload's case is refused by its own INSERT: core.cases.)"""
    if not app.key_cache.unchanged_since(caller.key_generation):
        with _refused_after(after):
            keys.require_still_valid(session, caller.principal.key_id)


@contextmanager
def _refused_after(after: str) -> Iterator[None]:
    """A key's refusal (revoked, or its clinic deactivated, since its request was authenticated),
    audited as a denial ``after`` a long poll or a slow upload."""
    try:
        yield
    except Unauthorized as exc:
        exc.audit = audit.PendingEvent("auth.denied", audit.DENIED, detail={"reason": exc.code, "after": after})
        raise


def _read(session: Session, app: AppState, caller: Caller, case_id: uuid.UUID) -> CaseOut:
    """One clinic's audited read of one case."""
    principal, actor = caller.principal, caller.actor
    read = case_reads.get_case(session, keyring=app.keyring, principal=principal, actor=actor, case_id=case_id)
    return case_out(read.case, read.result, read.client_ref)


@router.get(
    "/{case_id}/heatmap.png",
    response_class=Response,
    responses={
        **PROBLEMS,
        200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay"},
        409: PROBLEMS[404] | {"description": "the case has not succeeded (yet)"},
        410: PROBLEMS[404] | {"description": "the case's images were erased"},
    },
    dependencies=[clinic_first("heatmap.read")],
    summary="The Grad-CAM heat map over the image",
)
async def read_heatmap(case_id: uuid.UUID, app: State, caller: AuthenticatedCaller, db: Db) -> Response:
    def read(session: Session) -> bytes:
        limit(caller, app, "read")
        return case_reads.read_heatmap(
            session, keyring=app.keyring, principal=caller.principal, actor=caller.actor, case_id=case_id
        )

    return Response(await db.run(read, last=True), media_type="image/png", headers=NO_STORE)


@router.delete(
    "/{case_id}",
    response_model=CaseOut,
    responses=PROBLEMS,
    dependencies=[clinic_first("case.delete"), *NO_QUERY],
    summary="Erase a case's images and result",
)
async def erase_case(
    case_id: uuid.UUID, response: Response, app: State, caller: AuthenticatedCaller, db: Db
) -> CaseOut:
    """Crypto-shred the case's patient data now: the image, the heat map, the client reference and the
    result's findings (label, probabilities, referral). The case shows `purged`, without a result; the
    audit trail remains. Repeating the call changes nothing."""

    def erase(session: Session) -> CaseOut:
        limit(caller, app, "submit")
        case = retention.erase_case(session, principal=caller.principal, actor=caller.actor, case_id=case_id)
        return case_out(case, None, None)  # its client reference and its result are shredded

    out = await db.run(erase, last=True)
    response.headers.update(NO_STORE)
    return out
