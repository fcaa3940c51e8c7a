"""The audit tables' guards name what they check in full, and no session setting switches them off.

The insert guards of 0017 and 0021 looked their sequences up by an unqualified name, through the
caller's search path, which begins with the caller's temporary schema. The services' login, which
may create temporary tables (PUBLIC's default on a database), could make a temporary
``audit_verifications`` (or a sequence ``audit_events_id_seq``) whose sequence stood far ahead, and
the guard then read that one: a forged "the log verifies" row with an id above every real result
stayed the latest for good, and ids taken ahead of the real sequence made every later audited
request fail. The guards now name ``public``'s sequences, every audit function runs with a fixed
search path (pg_catalog, public, then pg_temp, last), and ``dermq db upgrade`` revokes PUBLIC's
TEMPORARY on the database (core.db_roles.grant_runtime).

The append-only and no-truncate triggers fire whatever ``session_replication_role`` says
(``ENABLE ALWAYS``): a login granted that setting (``GRANT SET ON PARAMETER``, a managed database's
admin role) would otherwise run as a replica and skip them (production also refuses such a login).
The insert guards stay enabled the default way: a logical-replication subscriber applies rows as a
replica, with its own sequences behind the publisher's, and a guard firing there would refuse every
copied event (and rewrite its time).

Downgrade puts 0021's and 0017's guards back as they were, their search paths unset and the
triggers enabled the default way.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 21:40:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_GUARD = """
CREATE OR REPLACE FUNCTION audit_events_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.hash IS NOT NULL OR NEW.prev_hash IS NOT NULL THEN
        RAISE EXCEPTION 'audit_events: a new event has no chain hash (the chain ended with the Merkle log)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.id > coalesce(pg_sequence_last_value({sequence}), 0) THEN
        RAISE EXCEPTION 'audit_events: an event''s id comes from its sequence'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.occurred_at := clock_timestamp();
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END;
$$
"""

RESULT_GUARD = """
CREATE OR REPLACE FUNCTION audit_verifications_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id > coalesce(
        pg_sequence_last_value(pg_get_serial_sequence({table}, 'id')::regclass), 0
    ) THEN
        RAISE EXCEPTION 'audit_verifications: a result''s id comes from its sequence'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.checked_at := now();
    RETURN NEW;
END;
$$
"""

FUNCTIONS = (
    "audit_events_append_only()",
    "audit_log_append_only()",
    "audit_events_insert_guard()",
    "audit_verifications_insert_guard()",
)
LOG_TABLES = ("audit_leaves", "audit_nodes", "audit_checkpoints", "audit_verifications")
TRIGGERS = (
    ("audit_events", "audit_events_append_only"),
    ("audit_events", "audit_events_no_truncate"),
    *((table, f"{table}_append_only") for table in LOG_TABLES),
    *((table, f"{table}_no_truncate") for table in LOG_TABLES),
)


def upgrade() -> None:
    op.execute(EVENT_GUARD.format(sequence="'public.audit_events_id_seq'::regclass"))
    op.execute(RESULT_GUARD.format(table="'public.audit_verifications'"))
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SET search_path = pg_catalog, public, pg_temp")
    for table, trigger in TRIGGERS:
        op.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def downgrade() -> None:
    for table, trigger in TRIGGERS:
        op.execute(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} RESET search_path")
    op.execute(EVENT_GUARD.format(sequence="'audit_events_id_seq'"))
    op.execute(RESULT_GUARD.format(table="'audit_verifications'"))
