"""An index on the queue in the order the workers take it, for the claim of a dynamic batch.

A worker claims its case and up to a batch's worth of company: the oldest queued first attempts,
urgent first, that fit a slot (``core.case_claims``). No index held that order, so each claim read
every queued case, worked out each one's decoded pixels (a logarithm in ``numeric``) and sorted them
all to take seven: about 16 us a queued case, 20 ms a claim with 1,500 queued and 49 ms with 3,000 on
a development machine, paid while the backlog it slowed was the largest. This partial index holds the
queued first attempts in the queue's order (``core.case_claims.QUEUE_ORDER``); the claim walks it
from the front and stops at its seventh taker: 0.2 ms with 3,000 queued.

The index is built ``CONCURRENTLY``, outside the migration's transaction (``migrations.online_indexes``):
intake inserts cases all day. Downgrade drops it.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-06 18:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_indexes

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_cases_queue_order"


def upgrade() -> None:
    online_indexes.build(
        {
            INDEX: "ON cases ((CASE WHEN priority = 'urgent' THEN 0 ELSE 1 END), created_at) "
            "WHERE status = 'queued' AND attempts = 0"
        }
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
