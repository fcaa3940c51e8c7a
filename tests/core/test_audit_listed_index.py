"""Migration 0015 on a database of its own: an auditor's "who saw case X" search reads the list views
that showed the case from an index, not from every list view ever recorded; an index a failed build
left behind is built again; the downgrade drops it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from core import audit
from core.models import AuditEvent

INDEX = "ix_audit_events_listed_cases"


def _list_views(connection: Connection, views: int, *, shown: str) -> None:
    """``views`` list views of 20 cases each, one of them (the middle one) showing ``shown``, and a
    case's own events besides."""
    connection.execute(
        text(
            "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, entity_type, detail) "
            "SELECT now(), 'case.list', 'success', 'api_key', 'case', jsonb_build_object('count', 20, 'ids', "
            "(SELECT jsonb_agg(CASE WHEN g = :middle AND n = 7 THEN :shown ELSE gen_random_uuid()::text END) "
            "FROM generate_series(1, 20) n)) FROM generate_series(1, :views) g"
        ),
        {"views": views, "middle": views // 2, "shown": shown},
    )
    connection.execute(
        text(
            "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, entity_type, entity_id) "
            "SELECT now(), 'case.read', 'success', 'api_key', 'case', gen_random_uuid()::text "
            "FROM generate_series(1, :views)"
        ),
        {"views": views},
    )
    connection.execute(text("ANALYZE audit_events"))


def _plan(connection: Connection, filters: audit.AuditFilter) -> str:
    """Postgres's plan for a page of the auditors' search (``audit.search``) with these filters, where
    it need not weigh a table this small against reading it whole: whether the index serves the
    statement the search sends, whatever the table's size."""
    query = select(AuditEvent).where(*filters.where()).order_by(AuditEvent.id.desc()).limit(51)
    compiled = query.compile(dialect=postgresql.dialect())
    params = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in compiled.params.items()}
    connection.execute(text("SET LOCAL enable_seqscan = off"))
    rows = connection.exec_driver_sql(f"EXPLAIN {compiled}", params)
    return "\n".join(row[0] for row in rows)


def _index_state(connection: Connection) -> tuple[bool, str] | None:
    row = connection.execute(
        text(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indexrelid = to_regclass(:name)"
        ),
        {"name": INDEX},
    ).first()
    return None if row is None else (row[0], row[1])


def test_a_case_search_finds_its_list_views_through_the_index(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "head")
    shown = str(uuid.uuid4())
    with engine.begin() as connection:
        _list_views(connection, 20000, shown=shown)
    filters = audit.AuditFilter(case_id=uuid.UUID(shown))
    with Session(engine) as session:
        page, _ = audit.search(session, filters, before_id=None, limit=50)
    assert [event.action for event in page] == ["case.list"]
    assert shown in page[0].detail["ids"]
    with engine.begin() as connection:
        plan = _plan(connection, filters)
    assert INDEX in plan, plan


def test_an_index_a_failed_build_left_is_built_again_and_the_downgrade_drops_it(
    scratch: tuple[Any, Engine],
) -> None:
    config, engine = scratch
    command.upgrade(config, "0014")
    with engine.begin() as connection:
        _list_views(connection, 10, shown=str(uuid.uuid4()))
    # a concurrent build that fails (here: a unique index over duplicates) leaves an invalid index
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        with pytest.raises(Exception, match="could not create unique index"):
            connection.execute(text(f"CREATE UNIQUE INDEX CONCURRENTLY {INDEX} ON audit_events (action)"))
        left = _index_state(connection)
        assert left is not None and not left[0]
    command.upgrade(config, "head")
    with engine.connect() as connection:
        valid, definition = _index_state(connection) or (False, "")
    assert valid
    assert "gin (detail jsonb_path_ops)" in definition and "case.list" in definition
    command.downgrade(config, "0014")
    with engine.connect() as connection:
        assert _index_state(connection) is None
