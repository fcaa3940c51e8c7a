"""What the blocking and the asyncio clients share: how requests are shaped, when and how long to wait
before a retry, and how answers become cases or typed exceptions. No I/O here."""

from __future__ import annotations

import mimetypes
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from dermq_client import errors
from dermq_client.models import Case, parse_case

__version__ = "0.1.0"
USER_AGENT = f"dermq-client/{__version__}"
#: the longest ``?wait=`` the server accepts (seconds); longer waits are several long polls
MAX_SERVER_WAIT = 30.0
#: statuses after which a request is sent again (with the same Idempotency-Key for a submission)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PRIORITIES = ("routine", "urgent")

ImageInput = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before sending a request again.

    ``attempts`` requests in all; between them ``Retry-After`` when the server gives one (up to
    ``max_delay``: a longer one is not retried but raised), else ``backoff * 2**n`` seconds with
    jitter (half to all of it), capped at ``max_delay``."""

    attempts: int = 4
    backoff: float = 0.5
    max_delay: float = 30.0

    def backoff_delay(self, retry: int) -> float:
        delay = min(self.max_delay, self.backoff * 2.0**retry)
        return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret

    def delay(self, retry: int, error: errors.DermqError) -> float | None:
        """Seconds to wait before retry number ``retry`` (0 for the first) after ``error``; ``None``: give up."""
        if retry + 1 >= self.attempts or not retryable(error):
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_delay else None
        return self.backoff_delay(retry)


def retryable(error: errors.DermqError) -> bool:
    return isinstance(error, errors.ConnectionFailed) or error.status in RETRY_STATUSES


def case_path(case_id: str | uuid.UUID, suffix: str = "") -> str:
    return f"/v1/cases/{quote(str(case_id), safe='')}{suffix}"


def wait_param(seconds: float) -> str:
    return f"{max(0.0, min(MAX_SERVER_WAIT, seconds)):.3f}"


def timeout_for(timeout: httpx.Timeout, wait: float) -> httpx.Timeout:
    """The client's timeout, with ``wait`` more seconds to read the answer of a long poll."""
    read = None if timeout.read is None else timeout.read + wait
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)


def load_image(image: ImageInput) -> tuple[bytes, str, str]:
    """(bytes, file name, media type). The file name sent is neutral ("image" and the file's
    extension): a local file name may carry patient data, and the server needs none."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), "image", "application/octet-stream"
    path = Path(image)
    suffix = path.suffix.lower() if path.suffix.isascii() and path.suffix[1:].isalnum() else ""
    media_type = mimetypes.types_map.get(suffix, "application/octet-stream")
    return path.read_bytes(), f"image{suffix}", media_type


def submit_request(
    image: tuple[bytes, str, str],
    *,
    client_ref: str | None,
    priority: str,
    idempotency_key: str,
    wait: float | None,
) -> dict[str, Any]:
    """Keyword arguments of ``httpx.Client.request`` for ``POST /v1/cases``."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    data, name, media_type = image
    fields = {"priority": priority}
    if client_ref is not None:
        fields["client_ref"] = client_ref
    request: dict[str, Any] = {
        "files": {"image": (name, data, media_type)},
        "data": fields,
        "headers": {"Idempotency-Key": idempotency_key},
    }
    if wait:
        request["params"] = {"wait": wait_param(wait)}
    return request


def connection_failed(exc: httpx.TransportError) -> errors.ConnectionFailed:
    return errors.ConnectionFailed(f"could not reach the dermq API: {type(exc).__name__}: {exc}")


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a success; else its typed exception is raised."""
    if response.is_success:
        return response
    raise errors.from_response(response)


def case_of(response: httpx.Response) -> Case:
    return parse_case(response.json(), replayed=response.headers.get("Idempotent-Replayed") == "true")


def new_idempotency_key() -> str:
    return str(uuid.uuid4())
