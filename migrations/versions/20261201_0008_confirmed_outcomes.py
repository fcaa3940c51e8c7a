"""Confirmed outcomes: `confirmed_outcomes`, a case's confirmed diagnosis as its clinic reports it.

One row per case (a correction replaces the row and raises `revision`); `dermq monitor report`
compares it with the model's label for field performance.

Downgrade: the schema before has no place for a clinic's confirmed diagnosis, so the downgrade refuses
while any is stored (after 0010's downgrade the table holds them in plain text).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 15:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "confirmed_outcomes",
        sa.Column("case_id", sa.UUID(), nullable=False),
        sa.Column("clinic_id", sa.UUID(), nullable=False),
        sa.Column("diagnosis", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("reported_by", sa.UUID(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "method IN ('histo', 'follow_up', 'consensus', 'confocal')", name=op.f("ck_confirmed_outcomes_method")
        ),
        sa.CheckConstraint(
            "diagnosis IN ('akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc')",
            name=op.f("ck_confirmed_outcomes_diagnosis"),
        ),
        sa.ForeignKeyConstraint(
            ["case_id"], ["cases.id"], name=op.f("fk_confirmed_outcomes_case_id_cases"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinics.id"], name=op.f("fk_confirmed_outcomes_clinic_id_clinics"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_confirmed_outcomes")),
    )
    op.create_index("ix_confirmed_outcomes_clinic", "confirmed_outcomes", ["clinic_id", "updated_at"], unique=False)


def downgrade() -> None:
    reported = op.get_bind().scalar(sa.text("SELECT count(*) FROM confirmed_outcomes"))
    if reported:  # clinics' reports, which no other table holds: dropped, they would be lost for good
        raise RuntimeError(
            f"{reported} confirmed outcomes are stored; the schema before revision 0008 has no place for them. "
            "Downgrading would lose the diagnoses clinics reported: restore a backup taken before the upgrade instead"
        )
    op.drop_index("ix_confirmed_outcomes_clinic", table_name="confirmed_outcomes")
    op.drop_table("confirmed_outcomes")
