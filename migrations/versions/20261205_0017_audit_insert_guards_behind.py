"""An audit event a day or more behind the database's clock is refused, and a verification result's id
and time are the database's.

Migration 0014 refused event times a day or more ahead; a time as far behind was let in. The
services' login could then insert events dated years back, or BC, or ``-infinity``: rows it cannot
delete, which dropped out of every export and time-bounded search, and which the driver cannot read
back (every search page holding one answered 500, and so did its inclusion proof).

``audit_verifications`` (the periodic check's results) had no guard at all: the latest result is the
row with the highest id, and its id column takes whatever an insert gives. One forged ``ok`` row with
an id far ahead stayed "latest" for good: the API and the console showed it, every real result
(failures too) went unseen beneath it, and each check resumed from it. Its id now comes from its
sequence, and its ``checked_at`` is the database's ``now()``.

Downgrade puts 0014's event guard back and drops the results' guard.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 07:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the check this migration adds to 0014's guard (the downgrade takes it out again)
BEHIND = """
    IF NEW.occurred_at < clock_timestamp() - interval '1 day' THEN
        RAISE EXCEPTION 'audit_events: an event cannot have happened a day or more behind the database''s clock'
            USING ERRCODE = 'check_violation',
                  HINT = 'check the writing host''s clock (NTP); a few minutes of drift are accepted';
    END IF;
"""

EVENT_GUARD = """
CREATE OR REPLACE FUNCTION audit_events_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.hash IS NOT NULL OR NEW.prev_hash IS NOT NULL THEN
        RAISE EXCEPTION 'audit_events: a new event has no chain hash (the chain ended with the Merkle log)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.id > coalesce(pg_sequence_last_value('audit_events_id_seq'), 0) THEN
        RAISE EXCEPTION 'audit_events: an event''s id comes from its sequence'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.occurred_at > clock_timestamp() + interval '1 day' THEN
        RAISE EXCEPTION 'audit_events: an event cannot have happened a day or more ahead of the database''s clock'
            USING ERRCODE = 'check_violation',
                  HINT = 'check the writing host''s clock (NTP); a few minutes of drift are accepted';
    END IF;
{behind}    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END;
$$
"""

RESULT_GUARD = """
CREATE FUNCTION audit_verifications_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id > coalesce(
        pg_sequence_last_value(pg_get_serial_sequence('audit_verifications', 'id')::regclass), 0
    ) THEN
        RAISE EXCEPTION 'audit_verifications: a result''s id comes from its sequence'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.checked_at := now();
    RETURN NEW;
END;
$$
"""


def upgrade() -> None:
    op.execute(EVENT_GUARD.format(behind=BEHIND))
    op.execute(RESULT_GUARD)
    op.execute(
        "CREATE TRIGGER audit_verifications_insert_guard BEFORE INSERT ON audit_verifications "
        "FOR EACH ROW EXECUTE FUNCTION audit_verifications_insert_guard()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_verifications_insert_guard ON audit_verifications")
    op.execute("DROP FUNCTION IF EXISTS audit_verifications_insert_guard()")
    op.execute(EVENT_GUARD.format(behind=""))
