"""Every migration's downgrade on a database of its own: each one, taken from head one step at a
time, leaves the schema exactly as it was before its upgrade (tables, columns, indexes, constraints,
triggers and their functions), down to an empty one; and up again, head is what it was. So a
rollback of any release can be run, and run forward again."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

SCHEMA = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = 'public'",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
    " WHERE connamespace = 'public'::regnamespace",
    "triggers": "SELECT event_object_table, trigger_name, event_manipulation, action_timing, action_statement"
    " FROM information_schema.triggers WHERE trigger_schema = 'public'",
    # a function's settings (its search path) and a trigger's mode (ENABLE ALWAYS) too
    "functions": "SELECT proname, prosrc, array_to_string(proconfig, ',') FROM pg_proc"
    " WHERE pronamespace = 'public'::regnamespace",
    "trigger modes": "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal",
}


def _schema(engine: Engine) -> dict[str, set[tuple[Any, ...]]]:
    """The schema's parts, without Alembic's own table (which stays, empty, at base)."""
    with engine.connect() as connection:
        return {
            part: {tuple(row) for row in connection.execute(text(query)) if row[0] != "alembic_version"}
            for part, query in SCHEMA.items()
        }


def test_every_downgrade_undoes_its_upgrade(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    revisions = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()][::-1]
    before: dict[str, dict[str, set[tuple[Any, ...]]]] = {}
    for revision in revisions:  # base to head, the schema before each one
        before[revision] = _schema(engine)
        command.upgrade(config, revision)
    head = _schema(engine)
    assert len(head["columns"]) > 100 and head["triggers"] and head["functions"]  # the schema was read

    for revision in reversed(revisions):
        command.downgrade(config, "-1")
        assert _schema(engine) == before[revision], f"the downgrade of {revision} left the schema changed"

    command.upgrade(config, "head")
    assert _schema(engine) == head


#: what the migrations make and no model maps: the audit log's tables and the event's transaction id,
#: which core.audit_log and core.audit_verify read and write in SQL of their own
UNMAPPED = {
    ("remove_table", "audit_checkpoints"),
    ("remove_table", "audit_nodes"),
    ("remove_table", "audit_verifications"),
    ("remove_table", "audit_leaves"),
    ("remove_index", "ix_audit_events_txid"),
    ("remove_column", "txid"),
}


def test_the_models_describe_the_schema_the_migrations_make(scratch: tuple[Any, Engine]) -> None:
    """Alembic's comparison of the migrated schema with the models (what `alembic revision
    --autogenerate` would write) finds nothing but the unmapped audit-log objects: a model without its
    migration, or a migration that drifted from its model, shows here."""
    import warnings

    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import core.outcome_models  # noqa: F401  (as migrations/env.py imports it)
    from core.models import Base

    config, engine = scratch
    command.upgrade(config, "head")
    with engine.connect() as connection, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy does not know the type xid8 (audit_events.txid)
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        found = compare_metadata(context, Base.metadata)
    named = set()
    for change in found:
        change = change[0] if isinstance(change, list) else change  # a column's changes come as a list
        action, obj = change[0], change[-1] if change[0] == "remove_column" else change[1]
        named.add((action, getattr(obj, "name", str(obj))))
    assert named == UNMAPPED, found
