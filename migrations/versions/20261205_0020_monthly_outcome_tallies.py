"""The field tally counts by month (``outcome_tallies.month``), so field performance has a recent window.

The tally kept lifetime counts per model only: a model that had served well for two years and then
began to miss melanomas (a new camera at a clinic, a shift in who is referred) would take years of new
cases to move its figures, and the melanoma alert read those figures. Each cell now also carries the
month its cases were submitted in (the first day of that month, UTC): still no case, clinic or day.

- ``outcome_tallies.month``: NULL for the counts already there, whose months nobody kept; they count
  in the figures over all time and in no window. A surrogate ``id`` becomes the primary key, and one
  unique index on the five columns (NULLS NOT DISTINCT: PostgreSQL 15 or later) keeps one row per cell.
- ``confirmed_outcomes.tally_month``: the month of the cell that counts a report, so that a correction
  takes its count back from that cell (NULL: the undated cell, for reports counted before this).

The downgrade adds each cell's months back together into the old undated cells.

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

CELL = ["model_id", "predicted", "referral", "truth"]


def upgrade() -> None:
    op.add_column("outcome_tallies", sa.Column("month", sa.Date(), nullable=True))
    op.add_column("outcome_tallies", sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False))
    op.drop_constraint("pk_outcome_tallies", "outcome_tallies", type_="primary")
    op.create_primary_key("pk_outcome_tallies", "outcome_tallies", ["id"])
    op.create_index(
        "uq_outcome_tallies_cell",
        "outcome_tallies",
        [*CELL, "month"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.add_column("confirmed_outcomes", sa.Column("tally_month", sa.Date(), nullable=True))


def downgrade() -> None:
    op.drop_column("confirmed_outcomes", "tally_month")
    op.execute(
        "CREATE TEMPORARY TABLE merged_tallies ON COMMIT DROP AS"
        " SELECT model_id, predicted, referral, truth, sum(count)::integer AS count FROM outcome_tallies"
        " GROUP BY model_id, predicted, referral, truth"
    )
    op.execute("DELETE FROM outcome_tallies")
    op.drop_index("uq_outcome_tallies_cell", table_name="outcome_tallies")
    op.drop_constraint("pk_outcome_tallies", "outcome_tallies", type_="primary")
    op.drop_column("outcome_tallies", "id")
    op.drop_column("outcome_tallies", "month")
    op.create_primary_key("pk_outcome_tallies", "outcome_tallies", CELL)
    op.execute(
        "INSERT INTO outcome_tallies (model_id, predicted, referral, truth, count)"
        " SELECT model_id, predicted, referral, truth, count FROM merged_tallies"
    )
