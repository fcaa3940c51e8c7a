"""An auditor's search with a time range reads about the range, not the log (``core.audit_ranges``).

Asked for the newest events of a range by id, Postgres walked the ids backwards from the newest and
tested each event's time: a range in the past read every newer event for its first page, and the last
page of any range every older one (half a second a million events; the statement timeout with tens
of millions: a search's 503, an export cut off mid-body). On a database of this module's own, with
60,000 events a minute apart (some of them out of time order, a clock stepped), both are read from
about the range's events; and every search, paged, still returns exactly the events that match.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from core import audit
from core.config import Settings
from core.db import get_engine, session_scope

EVENTS = 60_000
START = datetime(2026, 1, 1, tzinfo=UTC)
CLINIC = uuid.UUID("00000000-0000-4000-8000-00000000c0de")


def at(minutes: int) -> datetime:
    return START + timedelta(minutes=minutes)


@pytest.fixture(scope="module")
def log(own_database: Settings) -> Settings:
    """``EVENTS`` events, the n-th at minute n; every 997th three days later and every 991st three
    days earlier than its id says; every 10th filed under ``CLINIC``. Written with the insert guard
    off (it would give each the database's clock), on this module's database only."""
    with session_scope(own_database) as session:
        session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_insert_guard"))
        session.execute(
            text(
                "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, clinic_id, entity_type, entity_id)"
                " SELECT CAST(:start AS timestamptz) + make_interval(mins => g)"
                "   + CASE WHEN g % 997 = 0 THEN interval '3 days' WHEN g % 991 = 0 THEN -interval '3 days'"
                "     ELSE interval '0' END,"
                " 'case.read', 'success', 'api_key', CASE WHEN g % 10 = 0 THEN CAST(:clinic AS uuid) END,"
                " 'case', gen_random_uuid()::text FROM generate_series(1, :n) g ORDER BY g"
            ),
            {"start": START, "clinic": str(CLINIC), "n": EVENTS},
        )
        session.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_insert_guard"))
    with get_engine(own_database).connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE audit_events"))
    return own_database


def _matching(settings: Settings, filters: audit.AuditFilter) -> list[int]:
    """What a search must return, newest id first (one statement, no paging)."""
    with session_scope(settings) as session:
        rows = session.execute(
            text(
                "SELECT id FROM audit_events WHERE occurred_at >= coalesce(CAST(:since AS timestamptz), '-infinity')"
                " AND occurred_at < coalesce(CAST(:until AS timestamptz), 'infinity')"
                " AND (CAST(:clinic AS uuid) IS NULL OR clinic_id = CAST(:clinic AS uuid)) ORDER BY id DESC"
            ),
            {
                "since": filters.since,
                "until": filters.until,
                "clinic": str(filters.clinic_id) if filters.clinic_id else None,
            },
        )
        return [i for (i,) in rows]


@pytest.mark.parametrize(
    ("since", "until", "clinic"),
    [
        (at(5_000), at(6_440), None),  # a day in the past
        (at(5_000), at(6_440), CLINIC),
        (at(10_000), at(40_000), None),  # a wide range, events out of order in it and beside it
        (at(58_600), None, None),  # the last day
        (None, at(1_500), None),  # the first day
        (at(0), at(60_001), CLINIC),
        (at(99_000), None, None),  # nothing that late
        (at(-9_000), at(-10), None),  # nothing that early
    ],
)
def test_paging_through_a_time_range_returns_every_matching_event_once(
    log: Settings, since: datetime | None, until: datetime | None, clinic: uuid.UUID | None
) -> None:
    filters = audit.AuditFilter(since=since, until=until, clinic_id=clinic)
    expected = _matching(log, filters)
    for limit in (100, 1000):
        seen: list[int] = []
        before = None
        while True:
            with session_scope(log) as session:
                page, before = audit.search(session, filters, before_id=before, limit=limit)
            seen += [e.id for e in page]
            if before is None:
                break
        assert seen == expected, (limit, len(seen), len(expected))
    exported = [r["id"] for page in audit.export_pages(lambda: session_scope(log), filters) for r in page]
    assert exported == expected


def _rows_read(plan: dict[str, Any], counts: dict[str, int]) -> dict[str, int]:
    """Rows each table's scans in ``plan`` (EXPLAIN ANALYZE's JSON) read, over all their loops."""
    if "Relation Name" in plan:
        name = plan["Relation Name"]
        read = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        counts[name] = counts.get(name, 0) + read * plan["Actual Loops"]
    for child in plan.get("Plans", []):
        _rows_read(child, counts)
    return counts


@contextmanager
def _statements(settings: Settings) -> Iterator[list[tuple[str, Any]]]:
    kept: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        kept.append((statement, parameters))

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", keep)
    try:
        yield kept
    finally:
        event.remove(engine, "before_cursor_execute", keep)


@pytest.mark.parametrize(
    ("since", "until", "before"),
    [
        (at(3_000), at(13_080), None),  # the first page of a week in the past
        (at(40_000), at(50_080), 40_050),  # the last page of a week: fewer than a page left
    ],
)
def test_a_page_of_a_time_range_reads_about_the_range(
    log: Settings, since: datetime, until: datetime, before: int | None
) -> None:
    filters = audit.AuditFilter(since=since, until=until)
    in_range = len(_matching(log, filters))
    with _statements(log) as statements, session_scope(log) as session:
        page, _ = audit.search(session, filters, before_id=before, limit=100)
    assert page
    with get_engine(log).connect() as connection:
        for statement, parameters in statements:
            found = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).scalar()
            plan = (json.loads(found) if isinstance(found, str) else found)[0]["Plan"]
            read = _rows_read(plan, {}).get("audit_events", 0)
            assert read <= 2 * in_range + 100, (read, in_range, statement)
