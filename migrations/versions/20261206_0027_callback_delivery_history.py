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

from alembic import op

from migrations import online_indexes

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_callback_deliveries_settled"
DEFINITION = "ON callback_deliveries (updated_at) WHERE status <> 'pending'"


def upgrade() -> None:
    online_indexes.build({NAME: DEFINITION})


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {NAME}")
