"""Typed exceptions: every RFC 9457 problem the API answers becomes a :class:`DermqError` subclass
chosen by its HTTP status, carrying the problem's stable ``code``."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class DermqError(Exception):
    """An error from the dermq API (or from reaching it). ``code`` is the problem's stable code."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.title = title
        self.request_id = request_id
        self.retry_after = retry_after
        #: the whole problem document as the server sent it (``errors`` of a 422 among others)
        self.problem: dict[str, Any] = problem or {}
        #: on an error from ``submit``: the Idempotency-Key it sent (the one it made up when given
        #: none). Submit again with it: the server answers with the case if one was stored, never a second
        self.idempotency_key: str | None = None

    @property
    def errors(self) -> list[Any]:
        """The field errors of an ``invalid_input`` problem (empty otherwise)."""
        errors = self.problem.get("errors")
        return errors if isinstance(errors, list) else []

    def __str__(self) -> str:
        head = " ".join(str(p) for p in (self.status, self.code) if p is not None)
        tail = f" (request {self.request_id})" if self.request_id else ""
        return f"{head}: {self.detail}{tail}" if head else f"{self.detail}{tail}"


class BadRequest(DermqError):
    """400: a malformed request (``invalid_multipart``, ``invalid_cursor``, ...)."""


class Unauthorized(DermqError):
    """401: missing, unknown or revoked key, or an inactive clinic."""


class Forbidden(DermqError):
    """403: this key's role cannot do this."""


class NotFound(DermqError):
    """404: no such case for this clinic (``case_not_found``), or no heat map (``heatmap_unavailable``)."""


class RequestTimeout(DermqError):
    """408: the upload stalled or took too long on the way (``upload_stalled``, ``upload_timeout``);
    sent again by the client's retries."""


class Conflict(DermqError):
    """409: ``idempotency_key_reused``, ``case_not_finished`` or ``case_failed``."""


class Gone(DermqError):
    """410: ``case_purged``, the case was erased (its images and result are gone)."""


class PayloadTooLarge(DermqError):
    """413: the body or image is over the size limit."""


class UnsupportedMediaType(DermqError):
    """415: not an accepted image format, or not multipart."""


class InvalidInput(DermqError):
    """422: an invalid image or form field (``code`` says which); ``errors`` lists schema errors."""


class RateLimited(DermqError):
    """429: wait ``retry_after`` seconds."""


class ServerError(DermqError):
    """5xx: the service could not complete the request."""


class ServiceUnavailable(ServerError):
    """503: a dependency is down; retry after ``retry_after`` seconds."""


class ConnectionFailed(DermqError):
    """The API could not be reached, or the connection broke before an answer came."""


class UnexpectedResponse(DermqError):
    """A success answer that is not what dermq sends (a web page, other JSON): the base URL points
    at something other than the dermq API. ``status`` is the answer's HTTP status."""

    def __init__(self, detail: str, *, status: int, request_id: str | None = None) -> None:
        super().__init__(detail, status=status, code="unexpected_response", request_id=request_id)


class WaitTimeout(DermqError, TimeoutError):
    """The case did not end within the time given; ``case`` is the last state seen (or ``None``)."""

    def __init__(self, detail: str, *, case: Any = None) -> None:
        super().__init__(detail, code="wait_timeout")
        self.case = case


class InvalidSignature(DermqError, ValueError):
    """A completion callback whose signature or timestamp does not verify: ignore the request."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="invalid_signature")


BY_STATUS: dict[int, type[DermqError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidInput,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or ``None`` when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def from_response(response: httpx.Response) -> DermqError:
    """The typed exception for an error answer (a problem document, or any other body from a proxy)."""
    status = response.status_code
    if 300 <= status < 400:  # dermq never redirects: a proxy in front does (http:// to https://, a moved host)
        where = response.headers.get("Location")
        return UnexpectedResponse(
            f"the server redirected ({status}{' to ' + where if where else ''}): dermq answers no redirect; "
            "check the base URL (https:// where the API is behind TLS)",
            status=status,
            request_id=response.headers.get("X-Request-ID"),
        )
    problem: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            problem = parsed
    except ValueError:
        pass
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = response.reason_phrase or f"HTTP {status}"
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else DermqError)
    return cls(
        detail,
        status=status,
        code=problem.get("code") if isinstance(problem.get("code"), str) else None,
        title=problem.get("title") if isinstance(problem.get("title"), str) else None,
        request_id=problem.get("request_id") or response.headers.get("X-Request-ID"),
        retry_after=retry_after(response),
        problem=problem,
    )
