"""Working copies: a large upload's pixels at the size the worker needs (``ml.working_copy``), stored
by the intake as a ``working`` case blob so the worker never decodes the original again.

The wider list of blob kinds replaces the CHECK constraint online (migrations/online_checks.py): a
plain ``ADD CONSTRAINT`` held ``case_blobs`` against reads and writes while it checked every blob.

Downgrade deletes the working copies (the worker falls back to the original image).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 20:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_checks

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# the downgrade's, in its own transaction (migrations/online_checks.py)
def _blob_kinds(kinds: str) -> None:
    op.drop_constraint(op.f("ck_case_blobs_kind"), "case_blobs", type_="check")
    op.create_check_constraint(op.f("ck_case_blobs_kind"), "case_blobs", f"kind IN ({kinds})")


def upgrade() -> None:
    online_checks.replace(
        {
            "ck_case_blobs_kind": (
                "case_blobs",
                "kind IN ('image', 'heatmap', 'client_ref', 'result', 'outcome', 'working')",
            )
        }
    )


def downgrade() -> None:
    op.execute("DELETE FROM case_blobs WHERE kind = 'working'")
    _blob_kinds("'image', 'heatmap', 'client_ref', 'result', 'outcome'")
