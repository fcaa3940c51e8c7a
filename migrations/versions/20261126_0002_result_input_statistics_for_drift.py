"""Result input statistics for drift monitoring, and an index for per-day queries.

`input_stats` holds the brightness, contrast and size of each classified image (never pixels);
the drift report compares a day's values with the model's validation reference.

The index is built ``CONCURRENTLY`` (migrations/online_indexes.py), before the column is added: the
table takes a row for every finished case, and a plain ``CREATE INDEX`` would block those writes for
the build.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:42:55.639640+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import online_indexes

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # the index first: its concurrent build commits as it goes, and the column then commits with the
    # new version, so an upgrade stopped in the build runs again from the start
    online_indexes.build({"ix_results_created_at": "ON results (created_at)"})
    op.add_column(
        "results",
        sa.Column(
            "input_stats",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_index("ix_results_created_at", table_name="results")
    op.drop_column("results", "input_stats")
