"""FastAPI dependencies: the app's state, the request's database work (one Session, one transaction,
one thread: :mod:`api.db`), the caller and rate limits."""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth_turns import Turns
from api.db import Lanes, RequestDb
from api.intake_limits import Decoder, UploadSlots
from api.key_cache import KeyCache
from api.listener import Listener
from api.params import only
from api.waiters import CaseWaiters
from core import announcements, audit, keys
from core.config import Settings
from core.crypto import Keyring, KeyringSource
from core.db import session_scope
from core.errors import (
    BadRequest,
    DermqError,
    Forbidden,
    InvalidInput,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
    a_or_an,
)
from core.logs import request_id_var
from core.models import Role
from core.ratelimit import RateLimiter

log = logging.getLogger("dermq.api")


@dataclass
class AppState:
    settings: Settings
    keys: KeyringSource
    sessions: sessionmaker[Session]
    lanes: Lanes
    publisher: Celery
    redis: redis.Redis
    limiter: RateLimiter
    uploads: UploadSlots
    decoder: Decoder
    listener: Listener
    waiters: CaseWaiters
    key_cache: KeyCache
    #: one key check at a time per failure bucket (api.auth_turns)
    auth_turns: Turns = field(default_factory=Turns)

    @property
    def keyring(self) -> Keyring:
        """The current keyring (re-read after a key rotation)."""
        return self.keys.get()

    def committed(self, session: Session) -> None:
        """After a request's commit: a key it revoked (or a clinic it deactivated) stops working in
        this process at once, before the answer goes out, not when the notification comes back."""
        if announcements.keys_changed(session):
            self.key_cache.forget_all()


def app_state(request: Request) -> AppState:
    return request.app.state.dermq


async def state(request: Request) -> AppState:
    """:func:`app_state` as a dependency. A coroutine so that FastAPI calls it on the event loop: a
    plain function dependency is sent to the thread pool and back, on every request."""
    return app_state(request)


State = Annotated[AppState, Depends(state)]


async def request_db(request: Request) -> AsyncIterator[RequestDb]:
    """The request's unit of work: routes run their database work with ``await db.run(work)`` and
    never commit; this commits once the route has returned (before the response is sent), or rolls
    back if it raised. Every route uses it, the same way. A route whose last work is known may run it
    with ``db.run(work, last=True)``: the same commit (or rollback), in the same hop as the work."""
    app = app_state(request)
    db = RequestDb(app.sessions, app.lanes, app.committed)
    try:
        yield db
    except BaseException:
        await db.finish(commit=False)
        raise
    await db.finish(commit=True)


Db = Annotated[RequestDb, Depends(request_db, scope="function")]


def client_address(request: Request) -> str:
    """The client's address: the TCP peer's, or the one a configured proxy forwarded (the app's
    ProxyHeadersMiddleware has put it in place of the proxy's; see ``DERMQ_FORWARDED_ALLOW_IPS``)."""
    return request.client.host[:64] if request.client else "unknown"


def actor_for(request: Request) -> audit.Actor:
    return audit.Actor(
        type="anonymous",
        source_ip=client_address(request),
        user_agent=request.headers.get("user-agent"),
        request_id=request_id_var.get(),
    )


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "use 'Authorization: Bearer <key>'",
            code="invalid_credentials",
            audit=audit.PendingEvent("auth.denied", audit.DENIED, detail={"reason": "bad_scheme"}),
        )
    return token.strip()


@dataclass(frozen=True, slots=True)
class Caller:
    principal: keys.Principal
    actor: audit.Actor
    #: the key cache's generation when the key was authenticated (``KeyCache.unchanged_since``)
    key_generation: int = -1


def failure_bucket(source_ip: str | None, token: str | None) -> str:
    """Where failed logins count: per source address *and* key prefix. Guesses at one key's secret
    count against that key's prefix from that address; tokens that name no key (malformed, other
    schemes, prefixes no key has: ``token=None`` here) against the address alone. So garbage sprayed
    from a clinic's NAT never locks out the clinic's valid keys, and is limited all the same. An IPv6
    address counts as its /64: one host is given a whole /64, and could otherwise rotate through it
    for a fresh budget with every attempt."""
    prefix = keys.token_prefix(token) or "-"
    return f"authfail:{_network(source_ip)}:{prefix}"


def _network(source_ip: str | None) -> str | None:
    try:
        address = ipaddress.ip_address(source_ip or "")
    except ValueError:
        return source_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _too_many_failures(retry_after: int) -> RateLimited:
    return RateLimited(
        f"too many failed authentication attempts with this key from this address; retry in {retry_after} s",
        retry_after=retry_after,
    )


async def authenticate(request: Request, db: Db, app: State) -> Caller:
    """The API key's principal. Failed attempts are audited and limited per address and key prefix."""
    actor = actor_for(request)
    limit = app.settings.rate_limit_failed_auth_per_minute

    try:
        token = bearer_token(request)
    except Unauthorized:  # not a Bearer token: counted and limited like any other failed login
        counted = await db.run(lambda _: app.limiter.hit(failure_bucket(actor.source_ip, None), limit, failures=True))
        if not counted.allowed:
            raise _too_many_failures(counted.retry_after) from None
        raise

    def check(session: Session) -> keys.Principal:
        bucket = failure_bucket(actor.source_ip, token)
        state = app.limiter.check(bucket, limit, failures=True)
        if not state.allowed:
            raise _too_many_failures(state.retry_after)
        # Once this address has failed with this key, each further attempt is counted before the key
        # is checked (and given back unless it fails): guesses sent at once are checked no more often
        # than the limit (they take turns, api.auth_turns, so the first failure is counted before the
        # second guess is looked at). A key with no failures is checked without it, so a burst of
        # valid logins (a cold cache after any key change) is never refused.
        reserved = state.used
        if reserved:
            counted = app.limiter.hit(bucket, limit, failures=True)
            if not counted.allowed:
                raise _too_many_failures(counted.retry_after)
        try:
            principal = keys.authenticate(session, app.keyring, token)
        except keys.NoSuchKey as exc:
            # a prefix no key has counts against the address: inventing prefixes gains no fresh budget
            garbage = failure_bucket(actor.source_ip, None)
            if garbage != bucket or not reserved:
                if reserved:
                    app.limiter.refund(bucket, limit, failures=True)
                counted = app.limiter.hit(garbage, limit, failures=True)
                if not counted.allowed:
                    raise _too_many_failures(counted.retry_after) from None
            exc.audit = exc.audit or audit.PendingEvent("auth.denied", audit.DENIED, detail={"reason": exc.code})
            raise
        except Unauthorized as exc:
            if not reserved:
                app.limiter.hit(bucket, limit, failures=True)
            exc.audit = exc.audit or audit.PendingEvent("auth.denied", audit.DENIED, detail={"reason": exc.code})
            raise
        except BaseException:  # the database, not the key, failed: that is no failed login
            if reserved:
                app.limiter.refund(bucket, limit, failures=True)
            raise
        finally:
            session.rollback()  # nothing written: no connection stays idle in a transaction (an upload's read follows)
        if reserved:
            app.limiter.refund(bucket, limit, failures=True)
        if token is not None:
            app.key_cache.remember(token, principal, generation)
        return principal

    # A key verified since the last revocation anywhere costs neither a keyed hash nor a query.
    app.listener.start()  # a no-op once running; restarts it after an app shutdown that left this app serving
    generation = app.key_cache.generation()  # read before the key is looked up, in the cache or the database
    known = app.key_cache.get(token)
    if known is not None:
        principal = known
    elif not app.key_cache.remembering():  # taking turns would put every valid login of a burst in line
        principal = await db.run(check)
    else:
        async with app.auth_turns.turn(failure_bucket(actor.source_ip, token)):
            known = app.key_cache.get(token)  # verified by the check that held the turn before
            principal = known if known is not None else await db.run(check)
    caller = Caller(principal, actor.with_key(principal.key_id, principal.role.value, principal.clinic_id), generation)
    request.state.caller = caller  # for the audit of a later denial in this request
    return caller


AuthenticatedCaller = Annotated[Caller, Depends(authenticate)]


async def json_media_type(request: Request, caller: AuthenticatedCaller) -> None:
    """415 ``unsupported_media_type`` when a route that takes a JSON body gets another media type
    (FastAPI would validate the raw bytes and answer 422 about a field), and 422 ``duplicate_key`` for
    a JSON object that names a member twice (RFC 8259 leaves which one counts to the parser: the
    sender and dermq could read different values). After authentication: an unauthenticated caller is
    told that first. The body is the one FastAPI read (at most 64 KiB: api.middleware), parsed again."""
    media, _, parameters = request.headers.get("content-type", "").partition(";")
    media = media.strip().lower()
    if not (
        media == "application/json"
        or (media.startswith("application/") and media.endswith("+json") and "/+" not in media)
    ):
        shown = f"the body is {media[:64]}" if media else "the request has no Content-Type"
        raise UnsupportedMediaType(f"{shown}; send a JSON body with Content-Type: application/json")
    charset = _charset(parameters)
    if charset not in (None, "utf-8", "utf8"):
        raise UnsupportedMediaType(f"the body's charset is {charset[:32]}; send JSON in UTF-8 (RFC 8259)")
    # FastAPI's parse guesses UTF-16 and UTF-32 from the bytes; JSON between systems is UTF-8 only
    try:
        text = (await request.body()).decode("utf-8")
        json.loads(text or "null", object_pairs_hook=_unique_members)
    except RecursionError:  # FastAPI's own parse, a few frames shallower, may have just managed it
        raise BadRequest("the JSON body is nested too deeply") from None
    except ValueError:  # not UTF-8, or a byte-order mark, which only FastAPI's parse of bytes skips
        raise BadRequest("the JSON body is not UTF-8 text without a byte-order mark (RFC 8259)") from None


def _charset(parameters: str) -> str | None:
    """The ``charset`` of a Content-Type's parameters (after its first ``;``), lower-cased; None if none."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


async def no_query_parameters(request: Request, caller: AuthenticatedCaller) -> None:
    """422 ``unknown_parameter`` for any query parameter on a route that takes none, after
    authentication: a route that changes data must not ignore one (``DELETE /v1/cases/{id}?dry_run=true``
    erased the case)."""
    only(request, ())


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise InvalidInput(
                f"the JSON body names {name[:64]!r} twice in one object; send each member once",
                code="duplicate_key",
            )
        seen[name] = value
    return seen


#: for a route's ``dependencies``: its body is JSON (:func:`json_media_type`)
JSON_BODY = [Depends(json_media_type)]
#: for a route's ``dependencies``: it takes no query parameter (:func:`no_query_parameters`)
NO_QUERY = [Depends(no_query_parameters)]


def limit(caller: Caller, app: AppState, kind: str) -> None:
    """Count one request against the key's limit of ``kind`` (Redis: call it off the event loop)."""
    per_minute = (
        app.settings.rate_limit_submissions_per_minute if kind == "submit" else app.settings.rate_limit_reads_per_minute
    )
    decision = app.limiter.hit(f"{kind}:{caller.principal.key_id}", per_minute)
    if not decision.allowed:
        raise RateLimited(
            f"this key's {kind} limit of {per_minute} per minute is used up; retry in {decision.retry_after} s",
            retry_after=decision.retry_after,
        )


def require_role(caller: Caller, *roles: Role) -> None:
    if caller.principal.role not in roles:
        raise Forbidden(
            f"{a_or_an(caller.principal.role.value)} key cannot do this; "
            f"it needs {' or '.join(a_or_an(r.value) for r in roles)} key",
            code="role_not_allowed",
            audit=audit.PendingEvent(
                "access.denied", audit.DENIED, detail={"reason": "role", "role": caller.principal.role.value}
            ),
        )


async def record_denial(request: Request, error: DermqError) -> DermqError:
    """Write a denial's audit event in its own transaction (the request's rolled back); the error to
    answer with. A key's audited denials are counted like its reads: a refusal for its role comes
    before any other limit, and a key looping on a route its role cannot use wrote an audit event a
    request, for good, into a table nobody may delete from. Past the limit the answer is a 429, not
    audited, like every request over a limit."""
    pending: audit.PendingEvent = error.audit
    app = app_state(request)
    caller: Caller | None = getattr(request.state, "caller", None)
    actor = caller.actor if caller is not None else actor_for(request)
    if caller is not None:
        per_minute = app.settings.rate_limit_reads_per_minute
        bucket = f"denied:{caller.principal.key_id}"
        decision = await run_in_threadpool(app.limiter.hit, bucket, per_minute, failures=True)
        if not decision.allowed:
            return RateLimited(
                f"this key's refused requests passed {per_minute} per minute; retry in {decision.retry_after} s",
                retry_after=decision.retry_after,
            )

    def write() -> None:
        # None: the caller's clinic; and the other clinic's, where another is named. A caller of no clinic
        # (no key, a revoked one, an operator's) is filed under that clinic alone: a copy under no clinic
        # counted each attempt twice
        also = pending.also_clinic_id
        clinics: list[uuid.UUID | None] = (
            [None] if also is None or also == actor.clinic_id else [also] if actor.clinic_id is None else [None, also]
        )
        p = pending
        events = [audit.Event(p.action, p.outcome, actor, p.entity_type, p.entity_id, c, p.detail) for c in clinics]
        with session_scope(app.settings) as session:
            audit.record_many(session, events)

    try:
        await run_in_threadpool(write)
    except Exception as exc:
        log.error(
            "could not record a denied attempt in the audit trail",
            extra={"event": "audit_write_failed", "error": type(exc).__name__},
        )
    return error
