"""Result outcome: a diagnosis, or out of distribution (the image is not one the model can judge).

`outcome` is `diagnosis` for every existing row. An `out_of_distribution` result keeps its reasons
in `ood_reasons` and has no label, probabilities, confidence, uncertainty or referral: those columns
become nullable, and a CHECK constraint ties them to the outcome, so that the model's raw answer
for such an input can never be read back as a diagnosis. The constraints are added ``NOT VALID`` and
validated outside the migration's transaction (migrations/online_checks.py), which commits the new
columns first: a plain ``ADD CONSTRAINT`` held ``results`` against reads and writes while it checked
every row. The columns are added only where missing, so an upgrade stopped in a check runs again.

Downgrade: the old schema has no way to store a result without a label. Each out-of-distribution
result is removed and its case becomes `failed` with code `out_of_distribution` and a message that
says no diagnosis was made (the audit trail keeps what happened); upgrading again does not bring
those results back.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 11:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import online_checks

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIAGNOSIS_COLUMNS = ("label", "probabilities", "confidence", "uncertainty", "referral")
OUTCOME_FIELDS = (
    "(outcome = 'diagnosis' AND label IS NOT NULL AND probabilities IS NOT NULL AND confidence IS NOT NULL"
    " AND uncertainty IS NOT NULL AND referral IS NOT NULL AND ood_reasons = '[]'::jsonb)"
    " OR (outcome = 'out_of_distribution' AND label IS NULL AND probabilities IS NULL AND confidence IS NULL"
    " AND uncertainty IS NULL AND referral IS NULL AND referral_reasons = '[]'::jsonb AND gradcam_class IS NULL"
    " AND jsonb_typeof(ood_reasons) = 'array' AND ood_reasons <> '[]'::jsonb)"
)
DOWNGRADE_MESSAGE = (
    "the image did not look like a dermoscopy image of a skin lesion, so no diagnosis was made; "
    "retake the image with a dermatoscope and submit it as a new case"
)


def _column_types() -> dict[str, sa.types.TypeEngine[object]]:
    return {
        "label": sa.String(length=16),
        "probabilities": postgresql.JSONB(astext_type=sa.Text()),
        "confidence": sa.Float(),
        "uncertainty": sa.Float(),
        "referral": sa.Boolean(),
    }


def upgrade() -> None:
    op.add_column(
        "results", sa.Column("outcome", sa.Text(), server_default="diagnosis", nullable=False), if_not_exists=True
    )
    op.add_column(
        "results",
        sa.Column(
            "ood_reasons",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        if_not_exists=True,
    )
    for name, type_ in _column_types().items():
        op.alter_column("results", name, existing_type=type_, nullable=True)
    online_checks.add(
        {
            "ck_results_outcome": ("results", "outcome IN ('diagnosis', 'out_of_distribution')"),
            "ck_results_outcome_fields": ("results", OUTCOME_FIELDS),
        }
    )


def downgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE cases SET status = 'failed', failure_code = 'out_of_distribution', failure_message = :message,"
            " updated_at = now()"
            " FROM results WHERE results.case_id = cases.id AND results.outcome = 'out_of_distribution'"
            " AND cases.status = 'succeeded'"
        ).bindparams(message=DOWNGRADE_MESSAGE)
    )
    op.execute("DELETE FROM results WHERE outcome = 'out_of_distribution'")
    op.drop_constraint(op.f("ck_results_outcome_fields"), "results", type_="check")
    op.drop_constraint(op.f("ck_results_outcome"), "results", type_="check")
    for name, type_ in _column_types().items():
        op.alter_column("results", name, existing_type=type_, nullable=False)
    op.drop_column("results", "ood_reasons")
    op.drop_column("results", "outcome")
