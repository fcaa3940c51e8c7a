"""Query parameters that several routes share."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from starlette.requests import Request

from core.errors import BadRequest, InvalidInput


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
    otherwise be ignored, and a search or an export return everything."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        names = ", ".join(name[:32] for name in unknown[:8])
        raise InvalidInput(f"unknown query parameter(s): {names}{hint}", code="unknown_parameter")
