"""RFC 9457 problem details for every error the API returns. No stack trace ever leaves the server."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.waiters import ClientLeft
from core.errors import PERIOD_KEY_DESTROYED, DermqError, KeyNotHeld, PeriodKeyDestroyed, PeriodKeysUnavailable
from core.logs import request_id_var

log = logging.getLogger("dermq.api")
PROBLEM_BASE = "https://dermq.example/problems/"
MEDIA_TYPE = "application/problem+json"

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "rate_limited",
}


#: nginx's status for a request whose client closed the connection before the answer (a long poll's)
CLIENT_CLOSED_REQUEST = 499

#: Postgres's lock_timeout and statement_timeout: the database is busy, not down
BUSY_PGCODES = ("55P03", "57014")


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.url.path if request is not None else None,
        "request_id": request_id_var.get(),
        **(extra or {}),
    }
    response = JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def install(app: FastAPI, on_denied: Any) -> None:
    """Register the handlers. ``on_denied(request, error)`` records a denial's audit event and returns the
    error to answer with."""

    @app.exception_handler(DermqError)
    async def _domain(request: Request, exc: DermqError) -> JSONResponse:
        if exc.audit is not None:
            exc = await on_denied(request, exc)  # (a 429 once the key's audited refusals pass its limit)
        return problem(
            exc.status, exc.code, exc.title, exc.message, request=request, headers=exc.headers, extra=exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]
        return problem(
            422,
            "invalid_input",
            "Invalid input",
            "the request does not match the API's schema",
            request=request,
            extra={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(getattr(exc, "headers", None) or {})
        allowed = _allowed(app, request) if exc.status_code == 405 else []
        if allowed:  # every method of the path, not only the first route's that matched it
            headers["Allow"] = ", ".join(allowed)
        return problem(
            exc.status_code,
            code,
            code.replace("_", " ").capitalize(),
            detail,
            request=request,
            headers=headers or None,
        )

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        pgcode = getattr(exc.orig, "pgcode", None)
        if pgcode in BUSY_PGCODES:
            log.error("database lock or statement timeout", extra={"event": "database_timeout", "code": pgcode})
            return problem(
                503,
                "storage_timeout",
                "Service unavailable",
                "the request's records (its audit event included) could not be written in time, so no "
                "data was returned and nothing was stored. Retry after the delay given.",
                request=request,
                headers={"Retry-After": "2"},
            )
        log.error("database unavailable", extra={"event": "database_unavailable", "error": type(exc.orig).__name__})
        return problem(
            503,
            "database_unavailable",
            "Service unavailable",
            "the database is unreachable; nothing was stored. Retry after the delay given.",
            request=request,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(PoolTimeout)
    async def _database_busy(request: Request, exc: PoolTimeout) -> JSONResponse:
        # every connection of this process's pool stayed in use for database_pool_timeout_s
        log.error("no database connection free in time", extra={"event": "database_busy"})
        return problem(
            503,
            "database_busy",
            "Service unavailable",
            "the service is too busy to take this request now; nothing was stored. Retry after the delay given.",
            request=request,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return await _database_down(request, exc)  # type: ignore[arg-type]
        log.error("database error", extra={"event": "database_error", "error": type(exc.orig).__name__})
        return problem(
            503,
            "database_error",
            "Service unavailable",
            "the request could not be completed; nothing was stored. Retry later.",
            request=request,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(PeriodKeyDestroyed)
    async def _period_key_destroyed(request: Request, exc: PeriodKeyDestroyed) -> JSONResponse:
        # a case that outlived its period's key: restored from a backup older than the key's destruction.
        # The reads of a case answer an audited 410 (core.phi.refused_if_destroyed); this is the backstop.
        log.warning("a blob of a destroyed period was asked for", extra={"event": "period_key_destroyed"})
        return problem(410, "period_key_destroyed", "Gone", PERIOD_KEY_DESTROYED, request=request)

    @app.exception_handler(KeyNotHeld)
    async def _key_not_held(request: Request, exc: KeyNotHeld) -> JSONResponse:
        # a rotation's new key file has not reached this process yet (it is read again once it has)
        log.error("data sealed under a key this process does not hold", extra={"event": "key_not_held"})
        return problem(
            503,
            "key_unavailable",
            "Service unavailable",
            "the data this request needs is sealed under an encryption key that has not reached this server "
            "yet (a key rotation rolling out), so nothing was returned. Retry after the delay given.",
            request=request,
            headers={"Retry-After": "30"},
        )

    @app.exception_handler(PeriodKeysUnavailable)
    async def _period_keys_unavailable(request: Request, exc: PeriodKeysUnavailable) -> JSONResponse:
        # the period-key volume not mounted on this process, or lost, or a key file it must not read: the
        # intake answers the same (core.period_shredding); the reason, which names the file, is logged only
        log.error("period keys cannot be read", extra={"event": "period_keys_unavailable", "reason": str(exc)})
        return problem(
            503,
            "period_keys_unavailable",
            "Service unavailable",
            "the encryption keys this request needs cannot be read on this server, so nothing was returned; "
            "operators: check that DERMQ_PERIOD_KEY_DIR's shared volume is mounted (docs/OPERATIONS.md). "
            "Retry after the delay given.",
            request=request,
            headers={"Retry-After": "30"},
        )

    @app.exception_handler(ClientLeft)
    async def _client_left(request: Request, exc: ClientLeft) -> Response:
        # nobody reads it: the status is for the metrics and the access log
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a backstop: api.middleware.RequestContextMiddleware answers first, with the request's id
        return unexpected(request, exc)


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The 500 for an error nothing handled, logged with its traceback (the exception's text stays in
    the log: it may hold what a request sent)."""
    log.error("unhandled error", exc_info=exc, extra={"event": "unhandled", "error": type(exc).__name__})
    return problem(
        500,
        "internal_error",
        "Internal error",
        "an unexpected error occurred; quote the request id when reporting it",
        request=request,
    )


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """The methods the API's documented paths matching ``request``'s take (Starlette's 405 named those
    of the first route whose path matched, and a path such as /v1/cases/{id} has one route per method)."""
    path = request.url.path
    methods: set[str] = set()
    for pattern, operations in _operations(app):
        if pattern.fullmatch(path):
            methods |= operations
    for route in app.router.routes:  # the app's own routes outside the schema (/docs, the model cards)
        regex, taken = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and taken and regex.match(path):
            methods |= set(taken)
    return sorted(methods)


def _operations(app: FastAPI) -> list[tuple[re.Pattern[str], set[str]]]:
    """Each path of the app's OpenAPI document as a pattern ({name}: one segment) with its methods."""
    known = getattr(app.state, "_dermq_operations", None)
    if known is None:
        known = [
            (
                re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path))),
                {method.upper() for method in item if method.upper() in _METHODS},
            )
            for path, item in app.openapi().get("paths", {}).items()
        ]
        app.state._dermq_operations = known
    return known


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


#: a waiting submission's case is stored (api.routes.cases): what it is told when the database fails it
UNCONFIRMED = (
    "the case was stored, but the database {} confirm that it is on disk; poll it at its "
    "Location (case_id), or send the same request again with the same Idempotency-Key: it answers with "
    "this case, never a second one. A case that was lost with a database crash meanwhile is not found there: "
    "send it again then"
)


_WHY = {
    "database_busy": "was too busy to",
    "database_unavailable": "could not be reached to",
    "database_error": "failed to",
}


def stored_case_failure(exc: Exception) -> str:
    """The problem code of a failure once the case is stored: busy (no lane or connection in time, a
    lock or statement timeout, a deadlock, no resources), gone (a connection lost or refused, a
    shutdown: no SQLSTATE, or class 08 or 57P), else ``database_error``."""
    if not isinstance(exc, DBAPIError):
        return "database_busy"
    code = getattr(exc.orig, "pgcode", None) or ""
    if code in BUSY_PGCODES or code.startswith(("40", "53")):
        return "database_busy"
    if exc.connection_invalidated or not code or code.startswith(("08", "57P")):
        return "database_unavailable"
    return "database_error"


def unconfirmed_detail(code: str) -> str:
    """What a waiting submission answers with its stored case's id when its database failed it."""
    return UNCONFIRMED.format(_WHY[code])
