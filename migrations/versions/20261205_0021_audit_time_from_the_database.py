"""An audit event's time is the database's clock at its insert, whatever the insert says.

Events took the writing host's clock, and migrations 0014 and 0017 refused only times a day or more
off the database's. So the services' login could still date an event up to a day back or ahead of
when it happened, and hosts whose clocks drifted apart wrote events whose times disagreed with the
order the log sealed them in: an auditor asking "who read this case before noon" got an answer that
depended on the API host's NTP. The insert guard now sets ``occurred_at`` to ``clock_timestamp()``,
as it sets ``txid``, before the column's NOT NULL is checked: the services leave it out of their
inserts. Replacing the function takes no lock on the table (a column default would have taken the
audit table's exclusive lock, which every audited request waits for). A restore from ``pg_dump``
keeps its events' times: the dump loads rows before it makes triggers.

Downgrade puts 0017's guard back (times from the inserts, refused a day or more off); the release
before this one sends its times, as it did.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05 12:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = """    IF NEW.hash IS NOT NULL OR NEW.prev_hash IS NOT NULL THEN
        RAISE EXCEPTION 'audit_events: a new event has no chain hash (the chain ended with the Merkle log)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.id > coalesce(pg_sequence_last_value('audit_events_id_seq'), 0) THEN
        RAISE EXCEPTION 'audit_events: an event''s id comes from its sequence'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
"""

GUARD = """
CREATE OR REPLACE FUNCTION audit_events_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{checks}{time}    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END;
$$
"""

DATABASE_TIME = """    NEW.occurred_at := clock_timestamp();
"""

#: migration 0017's, to the character (the downgrade brings back its function as it was): the insert's
#: time, refused a day or more off the database's clock
HOST_TIME = """    IF NEW.occurred_at > clock_timestamp() + interval '1 day' THEN
        RAISE EXCEPTION 'audit_events: an event cannot have happened a day or more ahead of the database''s clock'
            USING ERRCODE = 'check_violation',
                  HINT = 'check the writing host''s clock (NTP); a few minutes of drift are accepted';
    END IF;

    IF NEW.occurred_at < clock_timestamp() - interval '1 day' THEN
        RAISE EXCEPTION 'audit_events: an event cannot have happened a day or more behind the database''s clock'
            USING ERRCODE = 'check_violation',
                  HINT = 'check the writing host''s clock (NTP); a few minutes of drift are accepted';
    END IF;
"""


def upgrade() -> None:
    op.execute(GUARD.format(checks=CHECKS, time=DATABASE_TIME))


def downgrade() -> None:
    op.execute(GUARD.format(checks=CHECKS, time=HOST_TIME))
