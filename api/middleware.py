"""ASGI middleware: request ids, access logs without patient data, security headers, and a cap on the
bodies of the JSON routes."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import observe_request
from api.problems import problem, unexpected
from api.waiters import LONG_POLL_WAIT
from core.logs import request_id_var

log = logging.getLogger("dermq.api.access")
#: A request id a client or proxy may choose: 32 hex digits (nginx's ``$request_id``) or a UUID. The id
#: goes into logs and audit events, so free text is never taken: a portal's own request id could be a
#: medical record number or a patient's name, and would land in both.
REQUEST_ID_RE = re.compile(r"[0-9A-Fa-f]{32}|[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
#: Every HTML page but /docs (the portal, the auditor console: api.pages): scripts and styles from this origin
#: only, no inline script, style or event handler; images also from blob: URLs (the heat map, fetched with the
#: key) and data: (the favicon); no native form submission (a page whose script failed to load must not send the
#: pasted API key in a URL); Trusted Types with no policy, so no string ever becomes HTML or script.
PAGE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'; require-trusted-types-for 'script'; "
    b"trusted-types 'none'"
)
#: /docs (api.docs_page): Swagger UI sets style attributes itself, hence 'unsafe-inline' for its styles (never
#: for scripts); the page sets this policy itself.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
HSTS = b"max-age=63072000; includeSubDomains"


class RequestContextMiddleware:
    """Give each request an id (``X-Request-ID``, echoed back), log it, and add security headers.

    The id is taken from the client only if it is 32 hex digits or a UUID (:data:`REQUEST_ID_RE`);
    otherwise a fresh one is made.
    Access logs carry method, route template, status and duration: never query strings or bodies.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        waited = [0.0]  # api.waiters adds the time a long poll waits for its case
        waited_token = LONG_POLL_WAIT.set(waited)
        started = time.perf_counter()
        status = 500
        secure = scope.get("scheme") == "https"

        started_response = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in names)
                # A 304 has no content type, and a browser merges its header fields into the page it
                # revalidated (RFC 9111, 4.3.4): it keeps the policy it was sent with the page.
                if b"content-security-policy" not in names and status != 304:
                    content_type = dict(headers).get(b"content-type", b"")
                    headers.append(
                        (b"content-security-policy", PAGE_CSP if content_type.startswith(b"text/html") else API_CSP)
                    )
                if secure:
                    headers.append((b"strict-transport-security", HSTS))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # answered here, not by Starlette's outermost handler: there the request's id was already
            # unset and the answer went out without it or the security headers
            if started_response:
                raise
            await unexpected(Request(scope), exc)(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            observe_request(route, str(scope.get("method")), status, max(0.0, seconds - waited[0]))
            log.info(
                "request",
                extra={
                    "event": "http_request",
                    "method": scope.get("method"),
                    "route": route,
                    "status_code": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "waited_ms": round(waited[0] * 1000, 2),
                    **_caller_ids(scope),
                },
            )
            LONG_POLL_WAIT.reset(waited_token)
            request_id_var.reset(token)


def _caller_ids(scope: Scope) -> dict[str, str]:
    """The authenticated key's id and its clinic's (``api.deps.authenticate`` keeps the caller in the
    request's state): which portal sends the uploads the API refuses, say. Ids, never a name or a token."""
    caller = (scope.get("state") or {}).get("caller")
    if caller is None:
        return {}
    principal = caller.principal
    ids = {"key_id": str(principal.key_id)}
    if principal.clinic_id is not None:
        ids["clinic_id"] = str(principal.clinic_id)
    return ids


#: The largest body a JSON route reads (a callback URL, an outcome, an admin's clinic or key: under a
#: kilobyte each). The upload route, ``POST /v1/cases``, bounds its multipart body itself (api.upload).
MAX_JSON_BODY = 64 * 1024
UPLOAD_ROUTE = ("POST", "/v1/cases")


class BodyLimitMiddleware:
    """Refuse a body over :data:`MAX_JSON_BODY` with 413, before authentication or any route reads it:
    at once when ``Content-Length`` says so, else as soon as the bytes received pass the limit (a
    chunked body); and one that stalls (nothing for ``idle_timeout`` s) or is not all there after
    ``timeout`` s with 408, as an upload's (FastAPI reads a JSON body before any dependency, the key
    included). Behind nginx its own limits apply first; uvicorn serving TLS itself has no other.
    Once the answer has started (an export streaming while its request still sends), a body that
    breaks these rules ends the exchange as a disconnect would."""

    def __init__(self, app: ASGIApp, *, idle_timeout: float = 30.0, timeout: float = 300.0) -> None:
        self.app = app
        self.idle_timeout, self.timeout = idle_timeout, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) == UPLOAD_ROUTE:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            await _too_large(Request(scope))(scope, receive, send)
            return
        received, complete, answering = 0, False, False
        ends = time.monotonic() + self.timeout

        async def answer(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        async def bounded() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                with anyio.fail_after(max(0.0, min(self.idle_timeout, ends - time.monotonic()))):
                    message = await receive()
            except TimeoutError:
                if answering:
                    return {"type": "http.disconnect"}
                raise HTTPException(408, _STALLED.format(idle=self.idle_timeout, timeout=self.timeout)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > MAX_JSON_BODY:
                    if answering:
                        return {"type": "http.disconnect"}
                    raise HTTPException(413, _TOO_LARGE)
            return message

        await self.app(scope, bounded, answer)


_STALLED = "the request body stalled (nothing for {idle:g} s) or was not all there after {timeout:g} s; send it again"
_TOO_LARGE = f"the request body is over {MAX_JSON_BODY // 1024} KiB; this route takes a small JSON document"


def _too_large(request: Request) -> ASGIApp:
    return problem(413, "payload_too_large", "Payload too large", _TOO_LARGE, request=request)
