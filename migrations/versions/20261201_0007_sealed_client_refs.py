"""Client references sealed: a ``client_ref`` kind of case blob, and a partial index that finds the
references still stored in plain text.

New cases store their client reference only as an envelope-encrypted blob (core/phi.py). Rows written
before keep ``cases.client_ref`` until the sweeper seals them (it needs the key file, which migrations
do not have) and empties the column; a later release drops it.

The index is built ``CONCURRENTLY`` (migrations/online_indexes.py), first: ``cases`` takes a row for
every submission, and a plain ``CREATE INDEX`` would block them for the build. The wider list of blob
kinds replaces the CHECK constraint online (migrations/online_checks.py): a plain ``ADD CONSTRAINT``
held ``case_blobs`` against reads and writes while it checked every blob.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 15:20:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import online_checks, online_indexes

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    online_indexes.build({"ix_cases_plain_client_ref": "ON cases (id) WHERE client_ref IS NOT NULL"})
    online_checks.replace({"ck_case_blobs_kind": ("case_blobs", "kind IN ('image', 'heatmap', 'client_ref')")})


def downgrade() -> None:
    sealed = op.get_bind().scalar(
        sa.text(
            "SELECT count(*) FROM case_blobs JOIN cases ON cases.id = case_blobs.case_id"
            " WHERE case_blobs.kind = 'client_ref' AND cases.status <> 'purged'"
        )
    )
    if sealed:  # the schema before holds references in plain text only: they would be deleted, for good
        raise RuntimeError(
            f"{sealed} client references are sealed; the schema before revision 0007 holds them in plain text "
            "only. Downgrading would lose them (each case's link to its patient record): restore a backup "
            "taken before the upgrade instead"
        )
    op.drop_index("ix_cases_plain_client_ref", table_name="cases")
    op.execute("DELETE FROM case_blobs WHERE kind = 'client_ref'")  # an erased case's leftovers only
    op.drop_constraint(op.f("ck_case_blobs_kind"), "case_blobs", type_="check")
    op.create_check_constraint(op.f("ck_case_blobs_kind"), "case_blobs", "kind IN ('image', 'heatmap')")
