"""Query parameters that several routes share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.errors import BadRequest


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
