"""A callback delivery keeps why its last attempt got no good answer (``last_error``).

A clinic's ``GET /v1/clinic/callback`` listed its failing deliveries with the last HTTP status only:
an attempt that got no answer at all (its receiver's name resolving to a private address, a refused
connection, a deadline) showed ``null``, and the clinic could not tell a firewall from a wrong URL.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 10:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("callback_deliveries", sa.Column("last_error", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("callback_deliveries", "last_error")
