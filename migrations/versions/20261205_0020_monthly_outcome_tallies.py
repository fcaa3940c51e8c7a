"""The field tally also counts by month of submission (``outcome_monthly_tallies``), so field
performance has a recent window.

The tally kept lifetime counts per model only: a model that had served well for two years and then
began to miss melanomas (a new camera at a clinic, a shift in who is referred) would take years of new
cases to move its figures, and the melanoma alert read those figures.

- ``outcome_monthly_tallies``: the same cells as ``outcome_tallies`` per month (the first day of the
  month the cases were submitted in, UTC), still with no case, clinic or day; ``dermq.purge`` keeps
  only the months of the recent window. ``outcome_tallies`` is left as it was: the lifetime counts,
  which the previous release goes on writing while a deploy rolls out (a report it takes counts
  over all time and in no month).
- ``confirmed_outcomes.tally_month``: the month whose cell counts a report, so that a correction takes
  its count back from that cell (NULL: counted before this migration, or by the previous release).

The downgrade drops both, and refuses while a month's tally is stored: the lifetime tally keeps the
counts, but not their months, and the rows of erased cases are gone, so the window cannot be rebuilt.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 12:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outcome_monthly_tallies",
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("predicted", sa.String(24), nullable=False),
        sa.Column("referral", sa.Boolean(), nullable=False),
        sa.Column("truth", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint(
            "model_id", "month", "predicted", "referral", "truth", name=op.f("pk_outcome_monthly_tallies")
        ),
    )
    op.add_column("confirmed_outcomes", sa.Column("tally_month", sa.Date(), nullable=True))


def downgrade() -> None:
    counted = op.get_bind().scalar(sa.text("SELECT count(*) FROM outcome_monthly_tallies"))
    if counted:
        raise RuntimeError(
            f"{counted} monthly outcome tallies are stored; the schema before revision 0020 has no place for them "
            "(outcome_tallies keeps the lifetime counts, not their months). Downgrading would lose the recent "
            "window of field performance: delete the rows of outcome_monthly_tallies first if that is acceptable, "
            "or restore a backup taken before the upgrade"
        )
    op.drop_column("confirmed_outcomes", "tally_month")
    op.drop_table("outcome_monthly_tallies")
