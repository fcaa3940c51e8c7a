"""A verification result says whether it reached the log's end (``complete``).

The periodic check now walks for at most 30 s and stores where it stopped, at a signed checkpoint,
for the next check to go on from: those rows say "good so far", not "the log verifies". Auditors'
``GET /v1/audit-events/verify`` answers the latest complete result, as the Redis gauge does; the
rows before this migration were all complete.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 16:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_verifications", sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    partial = op.get_bind().scalar(sa.text("SELECT count(*) FROM audit_verifications WHERE NOT complete"))
    if partial:  # the release before reads the latest row as "the log verifies", and an upgrade marks all complete
        raise RuntimeError(
            f"{partial} audit verification results stopped before the log's end; the old schema would read them "
            "as complete checks, so this downgrade refuses to drop the column"
        )
    op.drop_column("audit_verifications", "complete")
