"""Domain errors. Each carries its HTTP status and a stable machine-readable ``code``; the API renders
them as RFC 9457 problem details. Services raise these, never ``HTTPException``. Messages say what
went wrong and what to do, and never contain patient data or secrets.
"""

from __future__ import annotations

from typing import Any


class DermqError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        audit: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: a core.audit.PendingEvent to record in a transaction of its own (denied attempts)
        self.audit = audit
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(DermqError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(DermqError):
    status, code, title = 401, "unauthorized", "Authentication required"

    def __init__(self, message: str, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, code=code, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="dermq"')


class Forbidden(DermqError):
    status, code, title = 403, "forbidden", "Not allowed"


class NotFound(DermqError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(DermqError):
    status, code, title = 409, "conflict", "Conflict"


class RequestTimeout(DermqError):
    status, code, title = 408, "request_timeout", "Request timeout"


class Gone(DermqError):
    status, code, title = 410, "gone", "Gone"


class PayloadTooLarge(DermqError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(DermqError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class InvalidInput(DermqError):
    status, code, title = 422, "invalid_input", "Invalid input"


class InvalidImageError(DermqError):
    """An upload that ``ml.images`` refused; ``code`` is the ``InvalidImage`` code."""

    status, code, title = 422, "invalid_image", "Invalid image"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)
        if code == "unsupported_format":
            self.status = 415
        elif code in ("file_too_large", "too_large_to_decode"):
            self.status = 413


class RateLimited(DermqError):
    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = retry_after


class ServiceUnavailable(DermqError):
    status, code, title = 503, "service_unavailable", "Service unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: int = 5,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after), **(headers or {})}, extra=extra)


class KeyringError(RuntimeError):
    """Encryption keys are missing or malformed: the process must not start."""


class KeyNotHeld(KeyringError):
    """Data wrapped under a key this process's key file does not hold: a rotation still rolling out
    (a pod whose mounted file has not been updated yet), or a key removed before its rotation finished.
    Not the data's fault, and not for good: callers retry (the key file is read again when it changes)
    instead of giving the data up."""


class KeyFileUnfinished(KeyringError):
    """The key file does not parse: empty or cut short, as a file being written in place is (``tee`` over
    a compose secret's file, which must keep its inode). A running process keeps its last keyring and
    reads the file again on its next use (:class:`core.crypto.KeyringSource`)."""


class PeriodKeysUnavailable(KeyringError):
    """The period keys cannot be read in this process: their folder is missing, or holds no key (the
    shared volume not mounted, or lost), or a key file is open to others or not one dermq wrote. The
    operator's to mend, not the data's fault: a worker puts the case back, and an API read answers 503
    ``period_keys_unavailable`` (as the intake does) rather than a 500."""


class DecryptionError(RuntimeError):
    """A blob does not decrypt under its case, kind and key (tampered, moved or wrong key)."""


class PeriodKeyDestroyed(DecryptionError):
    """The blob's period key was destroyed (retention): nothing of that period decrypts again. A case
    can still point at such blobs after a restore from a backup older than the destruction."""


#: what a client is told when a case's data is sealed under a destroyed period key (410 ``period_key_destroyed``)
PERIOD_KEY_DESTROYED = (
    "this case's data was encrypted under a key that retention has destroyed: it can never be read "
    "again (tell your operator: such a case remains only where a backup was restored)"
)


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article ("an auditor", "a clinic")."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
