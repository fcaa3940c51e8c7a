"""Sealed confirmed diagnoses: a clinic's confirmed diagnosis of a case is an ``outcome`` case blob
(core/outcomes.py), like the result's findings; ``confirmed_outcomes.diagnosis`` becomes nullable and
is NULL once sealed. Rows written before keep their plain diagnosis until the sweeper seals them (it
needs the key file, which migrations do not have); a partial index finds those, built ``CONCURRENTLY``
before the rest (migrations/online_indexes.py), so that it blocks no clinic's report for the build.
The wider list of blob kinds replaces the CHECK constraint online (migrations/online_checks.py): a
plain ``ADD CONSTRAINT`` held ``case_blobs`` against reads and writes while it checked every blob.

Downgrade: refuses while a diagnosis is sealed (it cannot unseal without the keys).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 12:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import online_checks, online_indexes

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# the downgrade's, in its own transaction (migrations/online_checks.py)
def _blob_kinds(kinds: str) -> None:
    op.drop_constraint(op.f("ck_case_blobs_kind"), "case_blobs", type_="check")
    op.create_check_constraint(op.f("ck_case_blobs_kind"), "case_blobs", f"kind IN ({kinds})")


def upgrade() -> None:
    online_indexes.build(
        {"ix_confirmed_outcomes_plain_diagnosis": "ON confirmed_outcomes (case_id) WHERE diagnosis IS NOT NULL"}
    )
    online_checks.replace(
        {"ck_case_blobs_kind": ("case_blobs", "kind IN ('image', 'heatmap', 'client_ref', 'result', 'outcome')")}
    )
    op.alter_column("confirmed_outcomes", "diagnosis", existing_type=sa.String(16), nullable=True)


def downgrade() -> None:
    sealed = op.get_bind().scalar(sa.text("SELECT count(*) FROM confirmed_outcomes WHERE diagnosis IS NULL"))
    if sealed:
        raise RuntimeError(
            f"{sealed} confirmed diagnoses are sealed; the schema before 0010 cannot hold them "
            "(unsealing needs the key file, which migrations do not have)"
        )
    op.execute("DELETE FROM case_blobs WHERE kind = 'outcome'")
    op.drop_index("ix_confirmed_outcomes_plain_diagnosis", table_name="confirmed_outcomes")
    op.alter_column("confirmed_outcomes", "diagnosis", existing_type=sa.String(16), nullable=False)
    _blob_kinds("'image', 'heatmap', 'client_ref', 'result'")
