"""Result input statistics for drift monitoring, and an index for per-day queries.

`input_stats` holds the brightness, contrast and size of each classified image (never pixels);
the drift report compares a day's values with the model's validation reference.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:42:55.639640+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "results",
        sa.Column(
            "input_stats",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.create_index("ix_results_created_at", "results", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_results_created_at", table_name="results")
    op.drop_column("results", "input_stats")
