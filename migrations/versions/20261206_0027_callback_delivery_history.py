"""An index for the settled callback deliveries that retention now deletes once they are old.

The outbox kept one row per finished case of every clinic with a callback, for good. Retention now
deletes the settled ones (delivered, failed, cancelled) last updated more than
``DERMQ_CALLBACK_HISTORY_DAYS`` (30) ago, a batch at a time (core.retention); this partial index
finds them without reading the table. It covers nearly the whole table, which takes a write for every
finished case and every callback attempt: it is built ``CONCURRENTLY``, outside the migration's
transaction, as 0022 does (a plain ``CREATE INDEX`` would block those writes for the build). It
commits the earlier migrations of the same upgrade first; an index a failed attempt left invalid is
dropped and built again.

Downgrade drops the index (the rows deleted meanwhile stay deleted: the audit trail keeps each attempt).

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 00:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_callback_deliveries_settled"
DEFINITION = "ON callback_deliveries (updated_at) WHERE status <> 'pending'"
# no row (None) when there is no such index
INVALID = sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # a concurrent build waits for every older transaction of the database and blocks no request
        # meanwhile: the upgrade's lock timeout (migrations/env.py) must not end it
        online = not context.is_offline_mode()
        before = op.get_bind().execute(sa.text("SHOW lock_timeout")).scalar() if online else None
        op.execute("SET lock_timeout = 0")
        if online and op.get_bind().execute(INVALID, {"name": NAME}).scalar():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {NAME} {DEFINITION}")
        if before is not None:  # the migrations after this one wait no longer than the upgrade said
            op.get_bind().execute(sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": before})


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {NAME}")
