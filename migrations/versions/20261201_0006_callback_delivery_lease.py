"""Callback delivery lease: `callback_deliveries.leased_until`.

A worker leases a delivery row in a short transaction, commits, makes the HTTP request with no
transaction open, and records the answer in another short transaction fenced by the attempt number.
While `leased_until` lies in the future the row belongs to that attempt: a duplicated message finds
it leased and does nothing. NULL (every existing row) means no attempt is in flight.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 14:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("callback_deliveries", sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("callback_deliveries", "leased_until")
