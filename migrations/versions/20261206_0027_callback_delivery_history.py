"""An index for the settled callback deliveries that retention now deletes once they are old.

The outbox kept one row per finished case of every clinic with a callback, for good. Retention now
deletes the settled ones (delivered, failed, cancelled) last updated more than
``DERMQ_CALLBACK_HISTORY_DAYS`` (30) ago, a batch at a time (core.retention); this partial index
finds them without reading the table.

Downgrade drops the index (the rows deleted meanwhile stay deleted: the audit trail keeps each attempt).

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 00:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_callback_deliveries_settled",
        "callback_deliveries",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("status <> 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_callback_deliveries_settled", table_name="callback_deliveries")
