"""What the blocking and the asyncio clients share: how requests are shaped, when and how long to wait
before a retry, and how answers become cases or typed exceptions. No I/O here."""

from __future__ import annotations

import os
import random
import re
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from dermq_client import errors
from dermq_client.models import Case, CaseSummary, parse_case, parse_summary

__version__ = "0.1.0"
USER_AGENT = f"dermq-client/{__version__}"
#: the longest ``?wait=`` the server accepts (seconds); longer waits are several long polls
MAX_SERVER_WAIT = 30.0
#: seconds past a wait's deadline that its last long poll's answer is still read: the server answers
#: when its wait ends, and an answer that has not come a few seconds later is not coming
LATE_ANSWER = 5.0
#: statuses after which a request is sent again (with the same Idempotency-Key for a submission);
#: 408: the server gave up on an upload that stalled or trickled on the way (a flaky link)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PRIORITIES = ("routine", "urgent")
#: connections a client opens at most (httpx's default), each waiting call holding one
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
#: the most of an answer the client reads (unpacked, when it comes compressed). dermq's JSON answers
#: are kilobytes (a page of 200 cases, some 200 KiB) and a heat map is under 1 MiB at the default
#: overlay side (512); a larger answer is not dermq's (a base URL at a download, a proxy's page that
#: does not end, a gzip bomb) and was held whole in memory, or read for as long as it lasted
MAX_JSON_ANSWER = 4 << 20
#: a heat map's: room for an operator's overlay side of several thousand pixels (DERMQ_OVERLAY_MAX_SIDE)
MAX_HEATMAP_ANSWER = 64 << 20
#: the packing the client asks for, and those it unpacks itself (:class:`Body`), bounded by the limits
#: above. Not deflate: servers send it zlib-wrapped or raw, and only the first is read (zlib's header)
ACCEPT_ENCODING = "gzip"
UNPACKED = frozenset({"gzip", "x-gzip", "deflate"})

ImageInput = str | os.PathLike[str] | bytes
#: the suffixes sent with an image (lower case) and their media types; any other is not sent
IMAGE_SUFFIXES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before sending a request again.

    ``attempts`` requests in all; between them ``Retry-After`` when the server gives one (up to
    ``max_delay``: a longer one is not retried but raised), else ``backoff * 2**n`` seconds with
    jitter (half to all of it), capped at ``max_delay``. A submission answered 429 with a
    ``Retry-After`` (its clinic's uploads in progress, or its rate, at their limit: a portal that
    sends many images at once queues behind its own uploads) is sent again for up to ``busy_for``
    seconds from its first try, past ``attempts``."""

    attempts: int = 4
    backoff: float = 0.5
    max_delay: float = 30.0
    busy_for: float = 60.0

    def backoff_delay(self, retry: int) -> float:
        delay = min(self.max_delay, self.backoff * 2.0**retry)
        return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret

    def delay(self, retry: int, error: errors.DermqError, *, busy_until: float | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` (0 for the first) after ``error``; ``None``: give
        up. ``busy_until``: a ``time.monotonic()`` up to which a 429 with ``Retry-After`` is waited out."""
        if not retryable(error):
            return None
        if retry + 1 >= self.attempts and not _waits_out(error, busy_until):
            return None
        if error.retry_after is not None:
            if error.retry_after > self.max_delay:
                return None
            # at least what the server asked, and up to a quarter more: the many requests it refused
            # at once (a portal's batch behind its upload slots) do not all come back in the same instant
            return error.retry_after * (1 + random.random() / 4)  # noqa: S311 - jitter, not a secret
        return self.backoff_delay(retry)


def _waits_out(error: errors.DermqError, busy_until: float | None) -> bool:
    """Whether ``error`` is a 429 whose ``Retry-After`` ends before ``busy_until`` (a monotonic time)."""
    if error.status != 429 or error.retry_after is None or busy_until is None:
        return False
    return time.monotonic() + error.retry_after <= busy_until


#: codes among RETRY_STATUSES that sending the same again cannot mend: the upload took the server's
#: whole upload time (300 s) on this link; the docs advise a smaller file
NOT_RETRIED = frozenset({"upload_timeout"})


def retryable(error: errors.DermqError) -> bool:
    if isinstance(error, errors.ConnectionFailed):
        return True
    return error.status in RETRY_STATUSES and error.code not in NOT_RETRIED


def followed(submitted: Case, later: Case | None) -> Case:
    """What ``submit(wait=...)`` returns once it followed ``submitted`` by long polls: the case as
    last seen, still marked replayed when the submission found an existing case."""
    return replace(later or submitted, replayed=submitted.replayed)


def list_params(
    status: str | None, priority: str | None, since: datetime | None, until: datetime | None, page_size: int | None
) -> dict[str, Any]:
    """The query of ``GET /v1/cases`` (times in ISO 8601; without an offset the server reads UTC)."""
    params: dict[str, Any] = {"status": status, "priority": priority, "limit": page_size}
    params |= {"since": since and since.isoformat(), "until": until and until.isoformat()}
    return {name: value for name, value in params.items() if value is not None}


def case_path(case_id: str | uuid.UUID, suffix: str = "") -> str:
    return f"/v1/cases/{quote(str(case_id), safe='')}{suffix}"


def wait_param(seconds: float) -> str:
    return f"{max(0.0, min(MAX_SERVER_WAIT, seconds)):.3f}"


def timeout_for(timeout: httpx.Timeout, wait: float, *, within: float | None = None) -> httpx.Timeout:
    """The client's timeout, with ``wait`` more seconds to read the answer of a long poll. ``within``:
    the seconds left to the caller's own deadline (``wait(timeout=...)``), past which the answer is
    read for at most :data:`LATE_ANSWER` more (the read timeout, if shorter): an API that does not
    answer then makes the caller wait its timeout and a little, not the read timeout on top of it."""
    read = None if timeout.read is None else timeout.read + wait
    if within is not None:
        late = within + (LATE_ANSWER if timeout.read is None else min(timeout.read, LATE_ANSWER))
        read = late if read is None else min(read, late)
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)


def load_image(image: ImageInput) -> tuple[bytes, str, str]:
    """(bytes, file name, media type). The file name sent is neutral: "image", with the file's suffix
    only when it is a known image suffix (``image.jpg``). A local file name may carry patient data
    ("Smith.MRN0042"), and the server needs none of it."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), "image", "application/octet-stream"
    path = Path(image)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return path.read_bytes(), "image", "application/octet-stream"
    return path.read_bytes(), f"image{suffix}", IMAGE_SUFFIXES[suffix]


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
    if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):  # the server's rule; its value is not repeated
        raise ValueError("an idempotency key must be 1 to 255 visible ASCII characters")
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


def request_failed(exc: httpx.RequestError) -> errors.DermqError:
    """The typed error of a request that got no usable answer: the network (retried), or an answer
    httpx could not read (a proxy's broken compression, a redirect loop: not dermq's, not retried)."""
    if isinstance(exc, httpx.LocalProtocolError):  # this client's request, refused before sending: not retried,
        # and its text not repeated (it may quote a header, such as the key)
        return errors.DermqError(f"the request could not be sent: {type(exc).__name__}", code="request_not_sent")
    if isinstance(exc, httpx.TransportError):
        return errors.ConnectionFailed(f"could not reach the dermq API: {type(exc).__name__}: {exc}")
    return errors.UnexpectedResponse(f"the answer could not be read: {type(exc).__name__}: {exc}", status=0)


class Body:
    """An answer's body, read chunk by chunk as it came over the network (:meth:`add`) up to ``limit``
    bytes once unpacked; :meth:`response` is the answer with it. Read with ``httpx``'s ``stream`` and
    ``iter_raw``, so that nothing past ``limit`` is read, and unpacked here: httpx unpacks each network
    chunk whole, and a gzip bomb's 64 KiB unpack to some 64 MiB before any limit could be checked."""

    def __init__(self, response: httpx.Response, limit: int) -> None:
        self._response, self._limit = response, limit
        self._parts: list[bytes] = []
        self._size = 0
        declared = response.headers.get("Content-Length", "")
        self.over = declared.isdigit() and int(declared) > limit  # said before a byte is read
        #: read whole by its transport (``httpx.MockTransport``), and unpacked by httpx: nothing to stream
        self.whole = response.is_stream_consumed
        self._packing = "identity" if self.whole else response.headers.get("Content-Encoding", "identity")
        self._packing = self._packing.strip().lower() or "identity"
        self._unpack = zlib.decompressobj(zlib.MAX_WBITS | 32) if self._packing in UNPACKED else None
        # a packing the client did not ask for (ACCEPT_ENCODING): not read; a success is not dermq's
        self.over = self.over or (self._unpack is None and self._packing != "identity")
        if self.whole and not self.over:
            self.add(response.content)

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk`` (unpacked, no further than one byte past the limit); False (and nothing kept)
        once the body runs past the limit: stop reading."""
        if self._unpack is not None:
            try:
                chunk = self._unpack.decompress(chunk, self._limit - self._size + 1)
            except zlib.error as exc:  # a proxy's broken compression, as httpx would have said it
                raise httpx.DecodingError(f"the answer's {self._packing} does not unpack: {exc}") from exc
        self._size += len(chunk)
        self.over = self.over or self._size > self._limit
        if not self.over:
            self._parts.append(chunk)
        return not self.over

    def response(self) -> httpx.Response:
        """The answer with its body read (and unpacked). One past the limit: an error status keeps its
        typed error (its page dropped, so a 502 is still retried); a success is not dermq's."""
        answer = self._response
        if self.over and answer.is_success:
            unknown = self._unpack is None and self._packing != "identity"
            raise not_dermq(answer, f"packed as {self._packing}" if unknown else f"larger than {self._limit >> 20} MiB")
        # the body is unpacked already: without Content-Encoding, httpx does not unpack it again
        kept = [(name, value) for name, value in answer.headers.multi_items() if name.lower() != "content-encoding"]
        return httpx.Response(
            answer.status_code,
            headers=kept,
            content=b"" if self.over else b"".join(self._parts),
            request=answer.request,
            extensions=answer.extensions,
        )


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a success; else its typed exception is raised."""
    if response.is_success:
        return response
    raise errors.from_response(response)


def not_dermq(response: httpx.Response, what: str) -> errors.UnexpectedResponse:
    """The error for a success answer that is not what dermq sends: the base URL points elsewhere."""
    media_type = response.headers.get("Content-Type", "no content type").partition(";")[0].strip()
    request = response.request
    return errors.UnexpectedResponse(
        f"{request.method} {request.url} answered HTTP {response.status_code} ({media_type}), not a dermq "
        f"answer ({what}); check the base URL",
        status=response.status_code,
        request_id=response.headers.get("X-Request-ID"),
    )


def json_of(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object; :class:`~dermq_client.errors.UnexpectedResponse` if it is none."""
    try:
        data = response.json()
    except ValueError:  # JSONDecodeError, or a body that is not text
        raise not_dermq(response, "no JSON") from None
    if not isinstance(data, dict):
        raise not_dermq(response, "not a JSON object")
    return data


def case_of(response: httpx.Response) -> Case:
    data = json_of(response)
    try:
        return parse_case(data, replayed=response.headers.get("Idempotent-Replayed") == "true")
    except (KeyError, TypeError, ValueError, AttributeError):  # JSON, but not a case
        raise not_dermq(response, "not a case") from None


def page_of(response: httpx.Response) -> tuple[list[CaseSummary], str | None]:
    """The rows of a ``GET /v1/cases`` page and its ``next_cursor``."""
    page = json_of(response)
    items, cursor = page.get("items"), page.get("next_cursor")
    if not isinstance(items, list) or not (cursor is None or isinstance(cursor, str)):
        raise not_dermq(response, "not a page of cases")
    try:
        return [parse_summary(item) for item in items], cursor or None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise not_dermq(response, "not a page of cases") from None


def png_of(response: httpx.Response) -> bytes:
    if not response.content.startswith(PNG_MAGIC):
        raise not_dermq(response, "not a PNG image")
    return response.content


def outcome_of(response: httpx.Response) -> dict[str, Any]:
    return json_of(response) if response.content else {}


def base_url(url: str) -> str:
    """``url`` without its trailing slash; ``ValueError`` if it is not an http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid base URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid base URL {url!r}: give http:// or https://, then a host")
    return url.rstrip("/")


#: what an API key may hold: visible ASCII (the server issues ``dq_`` keys of letters, digits, ``_`` and ``-``)
API_KEY = re.compile(r"[\x21-\x7e]+")


def headers(api_key: str) -> dict[str, str]:
    """The headers every request carries. The key is stripped of surrounding white space (a key read
    from a file or a secret often ends with a newline) and must then be visible ASCII: else a
    ``ValueError`` that does not repeat it (sent as it was, httpx refused the header with an error
    quoting the whole key, which then went to logs as a connection failure)."""
    key = api_key.strip()
    if not API_KEY.fullmatch(key):
        raise ValueError("an API key is visible ASCII characters only: check it for a stray character (not repeated)")
    return {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING}


def new_idempotency_key() -> str:
    return str(uuid.uuid4())
