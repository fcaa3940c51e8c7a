"""Query parameters that several routes share."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from pydantic import BeforeValidator
from starlette.requests import Request

from core.errors import BadRequest, InvalidInput


def _iso_8601(value: object) -> object:
    """pydantic reads a string of digits as Unix seconds: ``since=20260101`` (ISO 8601's basic form)
    became 1970-08-23, and a search found nothing, an export an empty file (``1.7e9``, ``.5`` too).
    Numbers are read as ISO 8601 or refused."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("give a time in ISO 8601 (2026-01-01 or 2026-01-01T10:00:00Z), not a number") from None
    return value


#: a time given in ISO 8601 (``2026-01-01``, ``20260101``, ``2026-01-01T10:00:00+01:00``), never a
#: number of seconds; with :func:`utc`, in UTC
ISO_8601 = BeforeValidator(_iso_8601)


def utc(value: datetime | None, name: str) -> datetime | None:
    """A timestamp parameter in UTC (a missing offset means UTC); offsets no real clock uses, and
    instants that fall outside the calendar once in UTC, are refused with 400 ``invalid_time_range``."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    offset = value.utcoffset()
    if offset is not None and abs(offset) > timedelta(hours=14):
        raise BadRequest(f"'{name}' has a UTC offset beyond +-14:00", code="invalid_time_range")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise BadRequest(f"'{name}' is outside the calendar in UTC", code="invalid_time_range") from None


def only(request: Request, allowed: Collection[str], hint: str = "") -> None:
    """422 ``unknown_parameter`` for a query parameter outside ``allowed``: a misspelt filter would
    otherwise be ignored, and a search or an export return everything; 422 ``repeated_parameter`` for
    one given twice, of which all but the last would be ignored."""
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        listed = ", ".join(name[:32] for name in unknown[:8])
        raise InvalidInput(f"unknown query parameter(s): {listed}{hint}", code="unknown_parameter")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)  # linear: URLs hold thousands
    if repeated:
        raise InvalidInput(f"query parameter(s) given more than once: {', '.join(repeated)}", code="repeated_parameter")
