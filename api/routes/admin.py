"""Admin routes: clinics and API keys (the same operations as the `dermq` CLI). Every change is audited.

Deactivating a clinic stops its keys at once (authentication checks the clinic on every request);
revoking a key does the same for that key. Only admin keys: the router checks the role before any
route's parameters (:func:`api.role_checks.role_first`), so another key gets the same audited 403 whatever
it sends.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api.deps import JSON_BODY, NO_QUERY, AppState, AuthenticatedCaller, Caller, Db, State, limit
from api.params import only
from api.role_checks import role_first
from api.routes.cases import JSON_PROBLEMS, NO_STORE, PROBLEMS
from api.schemas import ClinicIn, ClinicOut, KeyIn, KeyOut, NewKeyOut
from core import audit, clinics, keys
from core.models import ApiKey, Clinic, Role

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[role_first(Role.ADMIN)])


def _clinic(clinic: Clinic) -> ClinicOut:
    return ClinicOut(
        id=clinic.id,
        name=clinic.name,
        active=clinic.active,
        created_at=clinic.created_at,
        deactivated_at=clinic.deactivated_at,
    )


def _key(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        prefix=key.prefix,
        role=key.role,
        clinic_id=key.clinic_id,
        label=key.label,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


def _admin(caller: Caller, app: AppState) -> None:
    """Counted against the admin key's write limit (Redis: call it on the request's thread). The role
    was checked before the route's parameters, by the router."""
    limit(caller, app, "submit")


@router.post(
    "/clinics",
    status_code=201,
    response_model=ClinicOut,
    responses={**JSON_PROBLEMS, 409: PROBLEMS[404] | {"description": "a clinic of that name exists"}},
    dependencies=[*JSON_BODY, *NO_QUERY],
    summary="Create a clinic",
)
async def create_clinic(body: ClinicIn, app: State, caller: AuthenticatedCaller, db: Db) -> ClinicOut:
    def create(session: Session) -> ClinicOut:
        _admin(caller, app)
        return _clinic(clinics.create_clinic(session, body.name, actor=caller.actor))

    return await db.run(create)


@router.get("/clinics", response_model=list[ClinicOut], responses=PROBLEMS, summary="List clinics")
async def list_clinics(app: State, caller: AuthenticatedCaller, db: Db) -> list[ClinicOut]:
    def read(session: Session) -> list[ClinicOut]:
        _admin(caller, app)
        return [_clinic(c) for c in clinics.list_clinics(session)]

    return await db.run(read)


@router.post(
    "/clinics/{clinic_id}/deactivate",
    response_model=ClinicOut,
    responses=PROBLEMS,
    dependencies=NO_QUERY,
    summary="Deactivate a clinic (its keys stop working at once)",
)
async def deactivate_clinic(clinic_id: uuid.UUID, app: State, caller: AuthenticatedCaller, db: Db) -> ClinicOut:
    def deactivate(session: Session) -> ClinicOut:
        _admin(caller, app)
        return _clinic(clinics.set_active(session, clinic_id, False, actor=caller.actor))

    return await db.run(deactivate)


@router.post(
    "/clinics/{clinic_id}/activate",
    response_model=ClinicOut,
    responses=PROBLEMS,
    dependencies=NO_QUERY,
    summary="Reactivate a clinic",
)
async def activate_clinic(clinic_id: uuid.UUID, app: State, caller: AuthenticatedCaller, db: Db) -> ClinicOut:
    def activate(session: Session) -> ClinicOut:
        _admin(caller, app)
        return _clinic(clinics.set_active(session, clinic_id, True, actor=caller.actor))

    return await db.run(activate)


@router.post(
    "/keys",
    status_code=201,
    response_model=NewKeyOut,
    responses=JSON_PROBLEMS,
    dependencies=[*JSON_BODY, *NO_QUERY],
    summary="Create an API key (the secret is in this response only)",
)
async def create_key(body: KeyIn, response: Response, app: State, caller: AuthenticatedCaller, db: Db) -> NewKeyOut:
    def create(session: Session) -> NewKeyOut:
        _admin(caller, app)
        key, token = keys.create_key(
            session, app.keyring, role=Role(body.role), clinic_id=body.clinic_id, label=body.label, actor=caller.actor
        )
        return NewKeyOut(**_key(key).model_dump(), key=token)

    out = await db.run(create)
    response.headers.update(NO_STORE)
    return out


@router.get("/keys", response_model=list[KeyOut], responses=PROBLEMS, summary="List API keys (never their secrets)")
async def list_keys(
    request: Request,
    app: State,
    caller: AuthenticatedCaller,
    db: Db,
    clinic_id: Annotated[uuid.UUID | None, Query()] = None,
) -> list[KeyOut]:
    def read(session: Session) -> list[KeyOut]:
        _admin(caller, app)
        only(request, {"clinic_id"})  # ?clinic=... would otherwise list every clinic's keys
        audit.record(
            session,
            action="key.list",
            outcome=audit.SUCCESS,
            actor=caller.actor,
            entity_type="api_key",
            clinic_id=clinic_id,
        )
        return [_key(k) for k in keys.list_keys(session, clinic_id=clinic_id)]

    return await db.run(read)


@router.post(
    "/keys/{key_id}/revoke",
    response_model=KeyOut,
    responses=PROBLEMS,
    dependencies=NO_QUERY,
    summary="Revoke an API key now",
)
async def revoke_key(key_id: uuid.UUID, app: State, caller: AuthenticatedCaller, db: Db) -> KeyOut:
    def revoke(session: Session) -> KeyOut:
        _admin(caller, app)
        return _key(keys.revoke_key(session, key_id, actor=caller.actor))

    return await db.run(revoke)
