"""An index on the callback deliveries a worker is attempting, for the per-clinic limit on attempts.

A lease (core.callback_attempts) now counts the clinic's deliveries that a worker holds a live lease
on, and defers the callback while ``DERMQ_CALLBACK_CLINIC_CONCURRENCY`` of them are under way, so
that one clinic's slow receiver cannot take every callback worker's threads. This partial index holds
only the pending deliveries with a lease (a handful at any time): the count reads it, not the
clinic's whole history of deliveries. Built ``CONCURRENTLY`` (migrations/online_indexes.py): the
table takes a write for every finished case and every callback attempt.

Downgrade drops the index.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06 02:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_indexes

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_callback_deliveries_in_flight"
DEFINITION = "ON callback_deliveries (clinic_id, leased_until) WHERE status = 'pending' AND leased_until IS NOT NULL"


def upgrade() -> None:
    online_indexes.build({NAME: DEFINITION})


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {NAME}")
