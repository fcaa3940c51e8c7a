"""Reading a case submission: a multipart body parsed as it streams in, with hard caps.

Starlette's own form parser spools large files to a temporary file on disk; patient images must
never touch disk in plaintext, and an oversized body must be refused as soon as the cap is passed,
not after it was read. So the body is fed chunk by chunk to python-multipart's streaming parser,
into memory, and reading stops with 413 the moment a cap is crossed:

- the whole body: ``max_upload_bytes`` plus a little room for the text fields;
- the ``image`` part: ``max_upload_bytes``;
- each text field: 1 KiB (``client_ref`` is further limited by settings); at most 8 parts;
- time: 408 when nothing arrives for ``idle_timeout`` seconds or the body is not all there after
  ``timeout`` (a stalled connection would otherwise hold one of its clinic's upload slots for as long
  as it stays open).

A body must end with its closing boundary: one cut short (by a proxy, a client's bug, a body whose
Content-Length was computed without its last part) is refused with 400, never read as the parts that
did arrive, which would drop the last field (an urgent case queued as routine, a client reference
lost) or call a cut image empty.

Client file names are read only to be ignored: nothing in dermq ever uses a client-supplied path.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from core.errors import BadRequest, InvalidInput, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from core.models import Priority

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
FIELD_CAP = 1024
MAX_PARTS = 8
#: how often a body may hold ``CRLF--boundary`` (each part after the first begins with it, and the
#: closing one): python-multipart steps through Python code at each, about 0.8 us, where it passes
#: over anything else at memory speed (0.13 s against 0.0006 s a megabyte). A body that held it over
#: and over inside a part (RFC 2046 forbids it; a one-letter boundary and "\r\n--Xa" repeated) kept
#: the event loop busy 3 s per 25 MB upload.
MAX_DELIMITERS = MAX_PARTS + 1
FORM_OVERHEAD = 64 * 1024
TEXT_FIELDS = ("client_ref", "priority")
IMAGE_MEDIA_TYPES = ("image/", "application/octet-stream")
#: the part headers the intake reads (lower-cased, as kept), and how a refusal names them
READ_HEADERS = {b"content-disposition": "Content-Disposition", b"content-type": "Content-Type"}


@dataclass
class CaseForm:
    image: bytes = b""
    image_content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    name: str | None = None
    is_file: bool = False
    content_type: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _Collector:
    """python-multipart callbacks that build a :class:`CaseForm` and enforce the caps."""

    def __init__(self, max_image_bytes: int) -> None:
        self.max_image_bytes = max_image_bytes
        self.form = CaseForm()
        self.parts = 0
        self.seen_image = False
        self.part = _Part()
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidInput(
                f"the form has more than {MAX_PARTS} parts; send one image and its fields", code="too_many_parts"
            )
        self.part = _Part()
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self.header_field.lower()
        if name in READ_HEADERS and name in self.headers:  # which one counts is nobody's rule: neither does
            raise BadRequest(
                f"a part of the form has two {READ_HEADERS[name]} headers; send each header once",
                code="invalid_multipart",
            )
        self.headers[name] = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        self.part.name = name.decode("utf-8", "replace") if name is not None else None
        self.part.is_file = b"filename" in options
        content_type = self.headers.get(b"content-type")
        self.part.content_type = content_type.decode("latin-1").strip().lower() if content_type else None
        if self.part.name == "image":
            # Judge the raw header: python-multipart trims Windows paths to their last part.
            raw = self.headers.get(b"content-disposition", b"")
            raw_name = raw[raw.lower().find(b"filename") :] if b"filename" in raw.lower() else b""
            filename = options.get(b"filename", b"")
            if any(marker in raw_name for marker in (b"/", b"\\", b"\x00")) or (filename and not filename.strip(b". ")):
                raise InvalidInput(
                    "the image's file name contains a path or is a special name; send a plain file name",
                    code="invalid_filename",
                )
            if self.seen_image:
                raise InvalidInput("the form has more than one image; send one image per case", code="too_many_files")
            self.seen_image = True
        elif self.part.name in TEXT_FIELDS:
            if self.part.name in self.form.fields:
                raise InvalidInput(f"the field {self.part.name!r} appears twice", code="duplicate_field")
        else:
            what = (
                "a form part without a name"
                if self.part.name is None
                else f"unexpected form field {self.part.name[:64]!r}"
            )
            raise InvalidInput(
                f"{what}; the form takes 'image' (file), 'client_ref' and 'priority'", code="unexpected_field"
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part.size += end - start
        if self.part.name == "image":
            if self.part.size > self.max_image_bytes:
                raise PayloadTooLarge(
                    f"the image is larger than the {self.max_image_bytes // (1024 * 1024)} MiB limit",
                    code="image_too_large",
                )
        elif self.part.size > FIELD_CAP:
            raise InvalidInput(f"the field {self.part.name!r} is longer than {FIELD_CAP} bytes", code="field_too_large")
        self.part.chunks.append(bytes(data[start:end]))

    def on_part_end(self) -> None:
        payload = b"".join(self.part.chunks)
        self.part.chunks = []  # the joined copy alone stays: not the image twice until the next part
        if self.part.name == "image":
            self.form.image = payload
            self.form.image_content_type = self.part.content_type
        elif self.part.name is not None:
            try:
                self.form.fields[self.part.name] = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"the field {self.part.name!r} is not UTF-8 text", code="invalid_field") from None

    def callbacks(self) -> dict[str, object]:
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
                "on_part_data",
                "on_part_end",
            )
        }


def boundary_of(request: Request) -> bytes:
    content_type = request.headers.get("content-type")
    if not content_type:
        raise UnsupportedMediaType(
            "send the case as multipart/form-data with the file field 'image'", code="missing_content_type"
        )
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"the body is {media_type.decode('latin-1')[:64]}; send multipart/form-data with the file field 'image'",
            code="expected_multipart",
        )
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise BadRequest("the multipart body has no valid boundary", code="invalid_multipart")
    return boundary


def declared_length(request: Request) -> int | None:
    """The body length a request declares, or ``None`` for none or one that is not a number (which
    :func:`read_case_form` refuses)."""
    value = request.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def refuse_declared(request: Request, max_image_bytes: int) -> int:
    """400 for a Content-Length that is not a number, 413 for one over the body's limit, which it
    returns: a body that can never be accepted is told so before anything else looks at its size
    (a busy process's upload budget would answer 429, and the portal would send it again)."""
    max_body = max_image_bytes + FORM_OVERHEAD
    declared_bytes = declared_length(request)
    if declared_bytes is None and "content-length" in request.headers:
        raise BadRequest("Content-Length is not a number", code="invalid_content_length")
    if declared_bytes is not None and declared_bytes > max_body:
        raise PayloadTooLarge(
            f"the request is {declared_bytes} bytes; the limit is {max_body}", code="payload_too_large"
        )
    return max_body


async def read_case_form(
    request: Request,
    *,
    max_image_bytes: int,
    idle_timeout: float,
    timeout: float,
    reserve: Callable[[int], None] = lambda size: None,
) -> CaseForm:
    """Parse the submission as it arrives; raise 413 the moment a cap is passed, 408 when it stalls
    for ``idle_timeout`` seconds or takes longer than ``timeout``, 400 when it ends unfinished.

    ``reserve(size)`` is called for each chunk as it arrives, before it is kept: it raises to refuse
    the upload (:class:`api.intake_limits.BodyAllowance`)."""
    boundary = boundary_of(request)
    max_body = refuse_declared(request, max_image_bytes)
    collector = _Collector(max_image_bytes)
    parser = MultipartParser(boundary, collector.callbacks(), max_header_count=8, max_header_size=1024)  # type: ignore[arg-type]
    received = delimiters = 0
    delimiter = b"\r\n--" + boundary
    try:
        async for chunk in _arriving(request.stream(), idle_timeout, timeout):
            received += len(chunk)
            if received > max_body:
                raise PayloadTooLarge(f"the request is larger than the {max_body} byte limit", code="payload_too_large")
            reserve(len(chunk))
            delimiters = _write(parser, chunk, delimiter, delimiters)
        parser.finalize()
    except MultipartParseError:
        raise BadRequest("the multipart body is malformed", code="invalid_multipart") from None
    except ClientDisconnect:
        raise BadRequest(
            "the client closed the connection before the body was complete", code="incomplete_body"
        ) from None
    if parser.state != MultipartState.END:
        raise BadRequest(
            "the multipart body ends before its closing boundary: the upload is incomplete; send it again",
            code="incomplete_body",
        )
    if not collector.seen_image:
        raise InvalidInput("the form has no 'image' file", code="missing_image")
    content_type = collector.form.image_content_type
    if content_type and not content_type.startswith(IMAGE_MEDIA_TYPES):
        raise UnsupportedMediaType(
            f"the image part is declared as {content_type[:64]}; send an image (JPEG, PNG, TIFF, WebP or BMP)",
            code="unsupported_media_type",
        )
    return collector.form


def _write(parser: MultipartParser, chunk: bytes, delimiter: bytes, seen: int) -> int:
    """``parser.write(chunk)``, unless the body would hold ``delimiter`` more than
    :data:`MAX_DELIMITERS` times: then the chunk up to the first occurrence past them is written (the
    form's own refusal of the parts it has, such as too many files, comes first) and the body is
    refused. Returns the occurrences so far (one split across two chunks is not counted: at most one
    a chunk, whose cost is nothing beside the chunk's)."""
    found = seen + chunk.count(delimiter)
    if found > MAX_DELIMITERS:
        cut = -1
        for _ in range(MAX_DELIMITERS - seen + 1):
            cut = chunk.find(delimiter, cut + 1)
        parser.write(chunk[:cut])
        raise BadRequest(
            f"the multipart body holds its boundary more often than a form of at most {MAX_PARTS} parts does: "
            "it occurs inside a part; choose a boundary that does not occur in the data",
            code="invalid_multipart",
        )
    parser.write(chunk)
    return found


async def _arriving(chunks: AsyncIterator[bytes], idle_timeout: float, timeout: float) -> AsyncIterator[bytes]:
    """``chunks`` as they arrive; 408 when none comes for ``idle_timeout`` seconds, or when they have
    not all come ``timeout`` seconds after the first was asked for."""
    deadline = anyio.current_time() + timeout
    iterator = aiter(chunks)
    while True:
        left = deadline - anyio.current_time()
        try:
            with anyio.fail_after(max(0.0, min(idle_timeout, left))):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if left <= idle_timeout:
                raise RequestTimeout(
                    f"the upload took longer than {timeout:g} s; send it again", code="upload_timeout"
                ) from None
            raise RequestTimeout(
                f"the upload stalled: nothing arrived for {idle_timeout:g} s; send it again", code="upload_stalled"
            ) from None
        yield chunk


#: the submission's body in the OpenAPI document (the route reads it itself, with :func:`read_case_form`)
UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "one dermoscopy image: JPEG, PNG, TIFF, WebP or BMP",
                        },
                        "client_ref": {
                            "type": "string",
                            "maxLength": 128,
                            "description": "the portal's own reference, returned as sent",
                        },
                        "priority": {"type": "string", "enum": ["routine", "urgent"], "default": "routine"},
                    },
                },
                "encoding": {
                    "image": {
                        "contentType": "image/jpeg, image/png, image/tiff, image/webp, image/bmp, "
                        "application/octet-stream"
                    }
                },
            }
        },
    }
}


def validated_fields(fields: dict[str, str], idempotency_key: str | None, max_ref: int) -> tuple[str | None, Priority]:
    """The form's ``client_ref`` and ``priority`` and the Idempotency-Key header, checked."""
    priority_text = fields.get("priority", Priority.ROUTINE.value).strip() or Priority.ROUTINE.value
    try:
        priority = Priority(priority_text)
    except ValueError:
        raise InvalidInput("priority must be 'routine' or 'urgent'", code="invalid_priority") from None
    client_ref = fields.get("client_ref")
    if client_ref is not None:
        client_ref = client_ref.strip() or None
    if client_ref is not None and (len(client_ref) > max_ref or not client_ref.isprintable()):
        raise InvalidInput(
            f"client_ref must be printable text of at most {max_ref} characters", code="invalid_client_ref"
        )
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.match(idempotency_key):
        raise InvalidInput("Idempotency-Key must be 1 to 255 visible ASCII characters", code="invalid_idempotency_key")
    return client_ref, priority
