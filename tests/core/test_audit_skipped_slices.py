"""The look for events the log skipped reads the log a slice at a time (``core.audit_verify.skipped_events``).

``dermq audit verify`` looks over the whole log for committed events without a position. It did so in one
statement that hash-joined every event with every leaf, about a second a million events on a 2-core
host: a log of some fifteen million met the statement timeout (15 s) after the walk of all of it, and
the command ended with a traceback and no verdict. On a database of this module's own, with a log of
120,000 events: each statement of the look reads at most a slice of the events and of the leaves, and
the look still names every skipped event, in order, across slices, within ``after`` and ``upto``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from core import audit_verify
from core.config import Settings
from core.db import get_engine, session_scope
from tests import support

EVENTS = 120_000
#: the events given no position, one in each slice of the look
SKIPPED_AT = (10, 60_010, 110_010)
SLICE = 50_000


@pytest.fixture(scope="module")
def log(own_database: Settings) -> Iterator[tuple[Settings, list[int]]]:
    """A log of ``EVENTS`` events, written in four transactions, sealed but for those at ``SKIPPED_AT``
    (their leaves stand in: the look reads positions, not hashes)."""
    with session_scope(own_database) as session:
        assert session.scalar(text("SELECT count(*) FROM audit_events")) == 0
    for _ in range(4):
        with session_scope(own_database) as session:
            session.execute(
                text(
                    "INSERT INTO audit_events (action, outcome, actor_type, entity_type, entity_id) "
                    "SELECT 'case.read', 'success', 'api_key', 'case', gen_random_uuid()::text "
                    "FROM generate_series(1, :n)"
                ),
                {"n": EVENTS // 4},
            )
    with session_scope(own_database) as session:
        ids = list(session.scalars(text("SELECT id FROM audit_events ORDER BY txid, id")))
        skipped = [ids[i] for i in SKIPPED_AT]
        session.execute(
            text(
                "INSERT INTO audit_leaves (seq, event_id, leaf_hash) "
                "SELECT row_number() OVER (ORDER BY txid, id) - 1, id, '\\x00'::bytea FROM audit_events "
                "WHERE id <> ALL(:skipped)"
            ),
            {"skipped": skipped},
        )
    with get_engine(own_database).connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE audit_events, audit_leaves"))
    yield own_database, skipped


def _committed(settings: Settings, skipped: list[int]) -> None:
    """Wait until every skipped event counts as committed: below the cluster's oldest running
    transaction (pg_snapshot_xmin), which another database's transaction may hold back a while."""

    def named() -> bool:
        with session_scope(settings) as session:
            return audit_verify.skipped_events(session) == skipped

    support.wait_for(named, timeout=60, what="the skipped events to count as committed")


def _rows_read(plan: dict[str, Any], counts: dict[str, int]) -> dict[str, int]:
    """Rows each table's scans in ``plan`` (EXPLAIN ANALYZE's JSON) read, over all their loops."""
    if "Relation Name" in plan:
        name = plan["Relation Name"]
        counts[name] = counts.get(name, 0) + plan["Actual Rows"] * plan["Actual Loops"]
        counts[name] += plan.get("Rows Removed by Filter", 0) * plan["Actual Loops"]
    for child in plan.get("Plans", []):
        _rows_read(child, counts)
    return counts


def test_each_statement_of_the_look_reads_a_slice_of_the_log(log: tuple[Settings, list[int]]) -> None:
    settings, skipped = log
    assert getattr(audit_verify, "SKIPPED_SLICE", SLICE) == SLICE
    _committed(settings, skipped)
    statements: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        statements.append((statement, parameters))

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", keep)
    try:
        with session_scope(settings) as session:
            assert audit_verify.skipped_events(session) == skipped
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    looks = [(s, p) for s, p in statements if "audit_events" in s]
    with engine.connect() as connection:
        for statement, parameters in looks:
            found = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).scalar()
            plan = (json.loads(found) if isinstance(found, str) else found)[0]["Plan"]
            read = _rows_read(plan, {})
            assert max(read.values()) <= SLICE + 1, (read, statement)
    assert len(looks) > EVENTS // SLICE  # the log read in several statements


def test_the_look_names_the_skipped_events_across_slices_within_its_bounds(log: tuple[Settings, list[int]]) -> None:
    settings, skipped = log
    _committed(settings, skipped)
    with session_scope(settings) as session:
        assert audit_verify.skipped_events(session, limit=2) == skipped[:2]  # the limit spans slices
        # positions: the events before the first skipped one hold 0..9, the next 10..60008, and so on
        assert audit_verify.skipped_events(session, after=SKIPPED_AT[0] + 1) == skipped[1:]
        assert audit_verify.skipped_events(session, after=SKIPPED_AT[1]) == skipped[2:]
        assert audit_verify.skipped_events(session, upto=SKIPPED_AT[2] - 2) == skipped[:2]
        assert audit_verify.skipped_events(session, upto=SKIPPED_AT[1] - 1) == skipped[:1]
        assert audit_verify.skipped_events(session, after=SKIPPED_AT[0] + 1, upto=SKIPPED_AT[2] - 2) == skipped[1:2]
