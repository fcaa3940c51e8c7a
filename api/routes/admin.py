"""Admin routes: clinics and API keys (the same operations as the `dermq` CLI). Every change is audited.

Deactivating a clinic stops its keys at once (authentication checks the clinic on every request);
revoking a key does the same for that key.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import AuthenticatedCaller, Caller, DbSession, State, limit, require_role
from api.routes.cases import NO_STORE, PROBLEMS
from api.schemas import ClinicIn, ClinicOut, KeyIn, KeyOut, NewKeyOut
from core import audit, clinics, keys
from core.models import ApiKey, Clinic, Role

router = APIRouter(prefix="/v1/admin", tags=["admin"])


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


def _admin(caller: Caller, app: State) -> None:
    require_role(caller, Role.ADMIN)
    limit(caller, app, "submit")


@router.post(
    "/clinics",
    status_code=201,
    response_model=ClinicOut,
    responses={**PROBLEMS, 409: PROBLEMS[404] | {"description": "a clinic of that name exists"}},
    summary="Create a clinic",
)
def create_clinic(body: ClinicIn, app: State, caller: AuthenticatedCaller, session: DbSession) -> ClinicOut:
    _admin(caller, app)
    return _clinic(clinics.create_clinic(session, body.name, actor=caller.actor))


@router.get("/clinics", response_model=list[ClinicOut], responses=PROBLEMS, summary="List clinics")
def list_clinics(app: State, caller: AuthenticatedCaller, session: DbSession) -> list[ClinicOut]:
    _admin(caller, app)
    return [_clinic(c) for c in clinics.list_clinics(session)]


@router.post(
    "/clinics/{clinic_id}/deactivate",
    response_model=ClinicOut,
    responses=PROBLEMS,
    summary="Deactivate a clinic (its keys stop working at once)",
)
def deactivate_clinic(clinic_id: uuid.UUID, app: State, caller: AuthenticatedCaller, session: DbSession) -> ClinicOut:
    _admin(caller, app)
    return _clinic(clinics.set_active(session, clinic_id, False, actor=caller.actor))


@router.post(
    "/clinics/{clinic_id}/activate", response_model=ClinicOut, responses=PROBLEMS, summary="Reactivate a clinic"
)
def activate_clinic(clinic_id: uuid.UUID, app: State, caller: AuthenticatedCaller, session: DbSession) -> ClinicOut:
    _admin(caller, app)
    return _clinic(clinics.set_active(session, clinic_id, True, actor=caller.actor))


@router.post(
    "/keys",
    status_code=201,
    response_model=NewKeyOut,
    responses=PROBLEMS,
    summary="Create an API key (the secret is in this response only)",
)
def create_key(
    body: KeyIn, response: Response, app: State, caller: AuthenticatedCaller, session: DbSession
) -> NewKeyOut:
    _admin(caller, app)
    key, token = keys.create_key(
        session, app.keyring, role=Role(body.role), clinic_id=body.clinic_id, label=body.label, actor=caller.actor
    )
    response.headers.update(NO_STORE)
    return NewKeyOut(**_key(key).model_dump(), key=token)


@router.get("/keys", response_model=list[KeyOut], responses=PROBLEMS, summary="List API keys (never their secrets)")
def list_keys(
    app: State, caller: AuthenticatedCaller, session: DbSession, clinic_id: Annotated[uuid.UUID | None, Query()] = None
) -> list[KeyOut]:
    _admin(caller, app)
    audit.record(
        session,
        action="key.list",
        outcome=audit.SUCCESS,
        actor=caller.actor,
        entity_type="api_key",
        clinic_id=clinic_id,
    )
    return [_key(k) for k in keys.list_keys(session, clinic_id=clinic_id)]


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, responses=PROBLEMS, summary="Revoke an API key now")
def revoke_key(key_id: uuid.UUID, app: State, caller: AuthenticatedCaller, session: DbSession) -> KeyOut:
    _admin(caller, app)
    return _key(keys.revoke_key(session, key_id, actor=caller.actor))
