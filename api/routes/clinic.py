"""The calling clinic's own settings: its completion callback (see core/callback_attempts.py for the body,
core/callback_urls.py for what URLs are accepted, core/callback_signing.py for the signature). Only clinic
keys: the router checks the role before any route's parameters (:func:`api.role_checks.role_first`), so
another key gets the same 403, audited as ``access.denied``, whatever it sends."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import JSON_BODY, NO_QUERY, AuthenticatedCaller, Db, State, limit
from api.role_checks import role_first
from api.routes.cases import JSON_PROBLEMS, NO_STORE, PROBLEMS
from core import callback_secrets, callbacks
from core.callback_signing import SIGNATURE_HEADER
from core.models import ClinicCallback, Role

router = APIRouter(prefix="/v1/clinic", tags=["clinic"], dependencies=[role_first(Role.CLINIC)])


class CallbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=8192,
        description="https URL without credentials that accepts a POST when one of the clinic's cases ends",
        examples=["https://portal.example-clinic.org/dermq/callback"],
    )


class CallbackOut(BaseModel):
    url: str
    signature_header: str = SIGNATURE_HEADER
    created_at: datetime
    updated_at: datetime
    previous_secret_valid_until: datetime | None = Field(
        None,
        description="until when the secret this registration replaced still signs each callback beside the "
        "current one (a second v1 value in the signature header, before the current secret's), so that the "
        "receiver can take the new secret into its configuration without refusing callbacks; null when none does",
    )


class DeliveryProblemOut(BaseModel):
    case_id: str
    status: str
    attempts: int
    last_http_status: int | None
    last_error: str | None = Field(
        description="why the last attempt got no good answer: 'http_status' (your server answered with "
        "last_http_status), 'url_refused' (the URL is no longer one dermq calls), 'UnsafeAddress' (its name "
        "resolves to a private or reserved address), 'DeadlineExceeded', a connection error's name such as "
        "'ConnectionRefusedError', 'unanswered' (the attempt never finished), or 'DecryptionError' (the "
        "secret cannot be read: register the callback again)"
    )
    updated_at: datetime


class CallbackStatusOut(CallbackOut):
    """The registration and how its deliveries fare."""

    deliveries_last_24h: dict[str, int] = Field(description="deliveries created in the last 24 h, by status")
    recent_problems: list[DeliveryProblemOut] = Field(
        description="the latest deliveries that failed for good or are being retried after a refusal"
    )
    retries: str = Field(description="how long dermq keeps trying one delivery")


class NewCallbackOut(CallbackOut):
    secret: str = Field(
        description="HMAC-SHA256 key of the Dermq-Signature header; shown only now, store it in your secret store"
    )


def _out(row: ClinicCallback) -> CallbackOut:
    return CallbackOut(
        url=row.url,
        created_at=row.created_at,
        updated_at=row.updated_at,
        previous_secret_valid_until=callback_secrets.overlap_until(row, datetime.now(UTC)),
    )


@router.put(
    "/callback",
    response_model=NewCallbackOut,
    responses=JSON_PROBLEMS,
    dependencies=[*JSON_BODY, *NO_QUERY],
    summary="Register (or replace) the clinic's completion callback; returns a new signing secret once",
)
async def put_callback(
    body: CallbackIn, response: Response, app: State, caller: AuthenticatedCaller, db: Db
) -> NewCallbackOut:
    """When a case ends, dermq POSTs `{"type": "case.finished", "case_id", "status", "timestamp"}` to the
    URL, signed in `Dermq-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`. No patient
    data is sent: fetch the result with `GET /v1/cases/{case_id}`. Registering again rotates the secret;
    the one it replaced signs beside the new one (another `v1` value, before the new one's) until
    `previous_secret_valid_until`, so accept any `v1` that matches a secret you hold."""

    def register(session: Session) -> NewCallbackOut:
        limit(caller, app, "submit")
        row, secret = callbacks.register(
            session,
            keyring=app.keyring,
            settings=app.settings,
            principal=caller.principal,
            actor=caller.actor,
            url=body.url,
        )
        return NewCallbackOut(**_out(row).model_dump(), secret=secret)

    out = await db.run(register)
    response.headers.update(NO_STORE)
    return out


@router.get(
    "/callback",
    response_model=CallbackStatusOut,
    responses=PROBLEMS,
    summary="The clinic's completion callback and how its deliveries fare",
)
async def get_callback(response: Response, app: State, caller: AuthenticatedCaller, db: Db) -> CallbackStatusOut:
    def read(session: Session) -> CallbackStatusOut:
        limit(caller, app, "read")
        row = callbacks.registered(session, principal=caller.principal, actor=caller.actor)
        health = callbacks.delivery_health(session, row.clinic_id)
        settings = app.settings
        return CallbackStatusOut(
            **_out(row).model_dump(),
            deliveries_last_24h=health.by_status,
            recent_problems=[
                DeliveryProblemOut(
                    case_id=str(d.case_id),
                    status=d.status,
                    attempts=d.attempts,
                    last_http_status=d.last_http_status,
                    last_error=d.last_error,
                    updated_at=d.updated_at,
                )
                for d in health.problems
            ],
            retries=(
                f"up to {settings.callback_max_attempts} attempts, backing off from "
                f"{settings.callback_backoff_seconds:g} s to at most {settings.callback_backoff_max_seconds:g} s "
                f"between them; then the delivery is failed. At most {settings.callback_clinic_concurrency} "
                "attempts at your server at once: the others wait their turn, uncounted"
            ),
        )

    out = await db.run(read)
    response.headers.update(NO_STORE)
    return out


@router.delete(
    "/callback", status_code=204, responses=PROBLEMS, dependencies=NO_QUERY, summary="Stop completion callbacks"
)
async def delete_callback(app: State, caller: AuthenticatedCaller, db: Db) -> Response:
    def unregister(session: Session) -> None:
        limit(caller, app, "submit")
        callbacks.unregister(session, principal=caller.principal, actor=caller.actor)

    await db.run(unregister)
    return Response(status_code=204, headers=NO_STORE)


@router.delete(
    "/callback/previous-secret",
    status_code=204,
    responses=PROBLEMS,
    dependencies=NO_QUERY,
    summary="Stop the secrets a rotation replaced from signing callbacks now, before their overlap ends",
)
async def delete_previous_secret(app: State, caller: AuthenticatedCaller, db: Db) -> Response:
    """After `PUT /v1/clinic/callback` rotated the secret, the one it replaced signs beside the new one
    until `previous_secret_valid_until`. Once your receiver has the new secret (or if an old one
    leaked), this ends that now: callbacks carry the current secret's signature alone."""

    def end(session: Session) -> None:
        limit(caller, app, "submit")
        callbacks.end_overlap(session, principal=caller.principal, actor=caller.actor)

    await db.run(end)
    return Response(status_code=204, headers=NO_STORE)
