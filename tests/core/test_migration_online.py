"""Migrations run while the previous release serves: none scans a table it holds against the release's
writes, and one stopped between its steps outside the transaction runs again.

A plain ``CREATE INDEX`` holds its table against writes for the whole build, and ``ADD CONSTRAINT ...
CHECK`` against reads and writes for the whole check: on the audit table, every audited request waits
that long. Event triggers note, for each DDL statement of each migration, the tables it scanned and
the locks its session held on them when it ended."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

#: the lock modes that stop a table's inserts, updates and deletes
BLOCKING = {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"}
#: (revision, table) scanned under such a lock on purpose: clinics has a row per clinic, written when
#: one is created or renamed, and 0012's unique index is checked for clashes in its own transaction
ALLOWED = {("0012", "clinics")}

PROBE = """
CREATE SCHEMA probe;
CREATE TABLE probe.ddl (query text, scans jsonb, locks text[]);
CREATE FUNCTION probe.scans() RETURNS jsonb LANGUAGE sql AS $$
    SELECT coalesce(jsonb_object_agg(relname, seq_scan), '{}') FROM pg_stat_xact_user_tables
    WHERE schemaname = 'public' $$;
CREATE FUNCTION probe.started() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('probe.scans', probe.scans()::text, true);
END $$;
CREATE FUNCTION probe.ended() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE
    before jsonb := coalesce(nullif(current_setting('probe.scans', true), ''), '{}')::jsonb;
BEGIN
    INSERT INTO probe.ddl SELECT current_query(),
        (SELECT coalesce(jsonb_agg(now.key), '[]') FROM jsonb_each_text(probe.scans()) now
         WHERE now.value::bigint > coalesce((before ->> now.key)::bigint, 0)),
        array(SELECT c.relname || ' ' || l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              WHERE l.pid = pg_backend_pid() AND l.granted AND c.relnamespace = 'public'::regnamespace);
END $$;
CREATE EVENT TRIGGER probe_started ON ddl_command_start EXECUTE FUNCTION probe.started();
CREATE EVENT TRIGGER probe_ended ON ddl_command_end EXECUTE FUNCTION probe.ended();
"""


def _tables(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))


def _not_ready(engine: Engine) -> list[str]:
    """Constraints left NOT VALID and indexes left invalid: what a stopped online step leaves."""
    with engine.connect() as connection:
        return list(
            connection.scalars(
                text(
                    "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
                    " AND (NOT convalidated OR conname LIKE '%\\_next')"
                    " UNION ALL SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid"
                )
            )
        )


def test_no_migration_scans_a_table_while_holding_it_against_writes(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    with engine.begin() as connection:
        connection.execute(text(PROBE))
    revisions = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()][::-1]
    held: list[str] = []
    seen = 0
    for revision in revisions:
        existing = _tables(engine)  # a table the migration makes is empty, and no request uses it yet
        command.upgrade(config, revision)
        with engine.begin() as connection:
            noted = connection.execute(text("DELETE FROM probe.ddl RETURNING query, scans, locks")).all()
        seen += len(noted)
        for query, scanned, locks in noted:
            for table in set(scanned) & existing:
                modes = {lock.split(" ")[1] for lock in locks if lock.split(" ")[0] == table} & BLOCKING
                if modes and (revision, table) not in ALLOWED:
                    held.append(f"{revision}: {' '.join(query.split())[:100]} scanned {table} holding {sorted(modes)}")
    assert seen > 100  # the probe saw the migrations' statements
    assert not held, "\n".join(held)
    assert _not_ready(engine) == []


@pytest.mark.parametrize(
    ("revision", "statement"),
    [
        ("0004", "ALTER TABLE results VALIDATE CONSTRAINT ck_results_outcome_fields"),  # its columns committed
        ("0005", "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_audit_events_txid"),  # its column committed
        ("0009", "ALTER TABLE results VALIDATE CONSTRAINT"),  # case_blobs' replacement check committed
    ],
)
def test_an_upgrade_stopped_in_an_online_step_runs_again(
    scratch: tuple[Any, Engine], revision: str, statement: str
) -> None:
    config, engine = scratch
    command.upgrade(config, f"{int(revision) - 1:04d}")

    def stop(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if sql.startswith(statement):
            raise RuntimeError("stopped: the connection dropped")

    event.listen(Engine, "before_cursor_execute", stop)
    try:
        with pytest.raises(RuntimeError, match="stopped"):
            command.upgrade(config, revision)
    finally:
        event.remove(Engine, "before_cursor_execute", stop)
    command.upgrade(config, revision)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == revision
    assert _not_ready(engine) == []
    command.upgrade(config, "head")
    assert _not_ready(engine) == []
