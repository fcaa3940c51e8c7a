"""Indexes for the periodic and per-request queries whose cost grew with the history behind them.

- ``ix_cases_expiring``: the hourly retention purge takes the oldest finished cases not yet purged
  (``created_at < cutoff``, ordered by it, 500 at a time). Without it each batch read every finished
  case still kept (the status index) and sorted them: about two million at 50 cases a minute and the
  default 30 days' retention, the whole table where retention is longer. Partial: purged cases, kept
  for good as tombstones, are not in it.
- ``ix_cases_created``: destroying a month's key (``dermq keys destroy-period``, and the purge that
  does it when a period expires) counts the month's live cases, and ``dermq keys periods`` counts
  each month's cases: a scan of the whole table each, without an index on ``created_at``.
- ``ix_callback_deliveries_problems``: a clinic's callback status (``GET /v1/callback``) lists its
  latest failed deliveries and those still retried after a refusal: without it, every delivery the
  clinic ever had was read (a million a year for a busy clinic) to find a handful.
- ``ix_audit_events_not_success``: auditors' searches for denied or failed events (``outcome=``)
  walked the whole log backwards, newest first, until a page of them was found.

Each is built ``CONCURRENTLY``, outside the migration's transaction, as 0015 does (the tables take
writes on every request; a plain ``CREATE INDEX`` would block them for the build). It commits the
earlier migrations of the same upgrade first; an index a failed attempt left invalid is dropped and
built again. Downgrade drops them in the migration's transaction.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 15:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_indexes

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_cases_expiring": "ON cases (created_at) WHERE purged_at IS NULL AND status IN ('succeeded', 'failed')",
    "ix_cases_created": "ON cases (created_at)",
    "ix_callback_deliveries_problems": (
        "ON callback_deliveries (clinic_id, updated_at) "
        "WHERE status = 'failed' OR (status = 'pending' AND attempts > 0)"
    ),
    "ix_audit_events_not_success": "ON audit_events (outcome, id) WHERE outcome <> 'success'",
}


def upgrade() -> None:
    online_indexes.build(INDEXES)


def downgrade() -> None:
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
