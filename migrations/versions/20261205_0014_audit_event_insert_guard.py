"""A new audit event is only ever an event: the database fills its transaction id, and refuses an old
chain hash, an id the sequence has not given out, or a time in the future.

The services' login may insert audit events (it writes them); nothing else about an insert was
checked. A row with a ``hash`` stopped every full ``dermq audit verify`` at the pre-log chain, for
good (the row cannot be deleted); a ``txid`` past every real transaction's moved the sealer's place
beyond the events written after it; an ``id`` ahead of the sequence made later real inserts fail;
an ``occurred_at`` past year 9999 could not be read back. A time a day or more ahead of the
database's clock is refused; a host whose clock drifts by minutes is not (it would fail every
audited request).

Downgrade drops the trigger and its function.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 00:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: an event's time comes from the writing host's clock, which may drift a little ahead of the
#: database's: only a time a day or more ahead (year 9999, say, which Python cannot read back) is refused
GUARD_FUNCTION = """
CREATE FUNCTION audit_events_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
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
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END;
$$
"""


def upgrade() -> None:
    op.execute(GUARD_FUNCTION)
    op.execute(
        "CREATE TRIGGER audit_events_insert_guard BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION audit_events_insert_guard()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_events_insert_guard ON audit_events")
    op.execute("DROP FUNCTION IF EXISTS audit_events_insert_guard()")
