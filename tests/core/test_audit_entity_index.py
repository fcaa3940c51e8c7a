"""Migration 0031 on a database of its own: an auditor's search by key reads a page of the requests
refused that presented the key (``auth.denied``, the key named as the entity) from an index, newest
first, instead of sorting every one of them for each page; the downgrade brings the old index back."""

from __future__ import annotations

import uuid
from typing import Any

from alembic import command
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from core import audit
from core.models import AuditEvent

INDEX, OLD = "ix_audit_events_entity_id", "ix_audit_events_entity"


def _refusals(connection: Connection, key: str, count: int) -> None:
    """``count`` refused requests presenting ``key``, among as many of other keys and other events."""
    connection.execute(
        text(
            "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, entity_type, entity_id) "
            "SELECT now(), 'auth.denied', 'denied', 'anonymous', 'api_key', "
            "CASE WHEN g % 2 = 0 THEN :key ELSE gen_random_uuid()::text END FROM generate_series(1, :n) g"
        ),
        {"key": key, "n": 2 * count},
    )
    connection.execute(
        text(
            "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, entity_type, entity_id) "
            "SELECT now(), 'case.read', 'success', 'api_key', 'case', gen_random_uuid()::text "
            "FROM generate_series(1, :n)"
        ),
        {"n": count},
    )
    connection.execute(text("ANALYZE audit_events"))


def _plans(connection: Connection, filters: audit.AuditFilter) -> list[str]:
    """Postgres's plan for each query of a page of the auditors' search (``audit.search``)."""
    plans = []
    for alternative in filters.alternatives():
        query = select(AuditEvent).where(*filters.where(), *alternative).order_by(AuditEvent.id.desc()).limit(51)
        compiled = query.compile(dialect=postgresql.dialect())
        params = {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in compiled.params.items()}
        rows = connection.exec_driver_sql(f"EXPLAIN {compiled}", params)
        plans.append("\n".join(row[0] for row in rows))
    return plans


def _indexes(connection: Connection) -> set[str]:
    found = connection.execute(
        text("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'audit_events'::regclass")
    )
    return {name for (name,) in found}


def test_a_keys_refused_requests_are_read_newest_first_from_the_index(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "head")
    key = uuid.uuid4()
    with engine.begin() as connection:
        _refusals(connection, str(key), 20000)
    filters = audit.AuditFilter(actor_key_id=key)
    with Session(engine) as session:
        page, cursor = audit.search(session, filters, before_id=None, limit=50)
    assert len(page) == 50 and cursor is not None
    assert {(e.action, e.entity_id) for e in page} == {("auth.denied", str(key))}
    with engine.begin() as connection:
        refused = _plans(connection, filters)[1]
    assert INDEX in refused and "Sort" not in refused, refused  # read in order, a page's worth


def test_the_downgrade_brings_the_old_index_back(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "head")
    with engine.connect() as connection:
        assert INDEX in _indexes(connection) and OLD not in _indexes(connection)
    command.downgrade(config, "0030")
    with engine.connect() as connection:
        assert OLD in _indexes(connection) and INDEX not in _indexes(connection)
    command.upgrade(config, "head")
    with engine.connect() as connection:
        assert INDEX in _indexes(connection) and OLD not in _indexes(connection)
