"""Periods of case creation (a UTC month, ISO week or day: ``DERMQ_KEY_PERIOD``), their bounds, and
the KEK ids of their keys (``period-2026-12``): the calendar side of :mod:`core.period_keys`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

PREFIX = "period-"
_PATTERNS = {
    "month": re.compile(r"^(\d{4})-(\d{2})$"),
    "week": re.compile(r"^(\d{4})-W(\d{2})$"),
    "day": re.compile(r"^(\d{4})-(\d{2})-(\d{2})$"),
}


def period_of(when: datetime, granularity: str) -> str:
    """The period (``2026-12``, ``2026-W49`` or ``2026-12-01``) that ``when`` falls in, in UTC."""
    at = when.astimezone(UTC)
    if granularity == "month":
        return f"{at:%Y-%m}"
    if granularity == "week":
        year, week, _ = at.isocalendar()
        return f"{year:04d}-W{week:02d}"
    return f"{at:%Y-%m-%d}"


def bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of ``period`` in UTC; a ValueError that says the formats for anything else."""
    try:
        if match := _PATTERNS["month"].match(period):
            year, month = int(match[1]), int(match[2])
            start = datetime(year, month, 1, tzinfo=UTC)
            return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        if match := _PATTERNS["week"].match(period):
            start = datetime.fromisocalendar(int(match[1]), int(match[2]), 1).replace(tzinfo=UTC)
            return start, start + timedelta(days=7)
        if match := _PATTERNS["day"].match(period):
            start = datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=UTC)
            return start, start + timedelta(days=1)
    except ValueError:
        pass
    raise ValueError(
        f"{period!r} is not a period; periods look like 2026-12 (month), 2026-W49 (week), 2026-12-01 (day)"
    )


def is_period(name: str) -> bool:
    try:
        bounds(name)
    except ValueError:
        return False
    return True


def kek_id(period: str) -> str:
    return PREFIX + period


def period_of_kek(kek: str) -> str | None:
    return kek[len(PREFIX) :] if kek.startswith(PREFIX) else None
