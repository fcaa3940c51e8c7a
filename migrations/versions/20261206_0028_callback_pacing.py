"""Callback pacing: a limit per clinic on the attempts under way, and no attempt before its backoff.

- ``ix_callback_deliveries_in_flight``: a lease (core.callback_attempts, core.callback_pacing) now
  counts the clinic's deliveries that a worker holds a live lease on, and defers the callback while
  ``DERMQ_CALLBACK_CLINIC_CONCURRENCY`` of them are under way, so that one clinic's slow receiver
  cannot take every callback worker's thread. This partial index holds only the pending deliveries
  with a lease (a handful at any time): the count reads it, not the clinic's whole history.
- ``ix_callback_deliveries_waiting``: an attempt that ends hands its turn to the clinic's oldest
  pending delivery; this partial index holds the pending ones only, in that order.
- ``callback_deliveries.next_attempt_at``: when an attempt that got no good answer is retried, the
  row says when, by the database's clock, and no lease is taken before then. Nullable, no default: a
  moment's lock.

The indexes are built ``CONCURRENTLY`` (migrations/online_indexes.py): the table takes a write for
every finished case and every callback attempt.

Downgrade drops both.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06 02:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import online_indexes

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_callback_deliveries_in_flight": (
        "ON callback_deliveries (clinic_id, leased_until) WHERE status = 'pending' AND leased_until IS NOT NULL"
    ),
    "ix_callback_deliveries_waiting": "ON callback_deliveries (clinic_id, created_at) WHERE status = 'pending'",
}


def upgrade() -> None:
    # the indexes first: their concurrent builds commit as they go, and the column then commits with
    # the new version, so an upgrade stopped in a build runs again from the start
    online_indexes.build(INDEXES)
    op.add_column("callback_deliveries", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("callback_deliveries", "next_attempt_at")
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
