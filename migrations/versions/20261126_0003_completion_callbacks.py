"""Completion callbacks: each clinic's callback endpoint (URL and sealed signing secret) and the
delivery outbox.

Generated from core.models with `alembic revision --autogenerate`, then edited by hand. The secret is
stored only as envelope-encrypted ciphertext (kind `callback_secret`), never in clear. A delivery
row is written in the transaction that ends a case, so a broker outage cannot lose the callback; the
partial index serves the sweeper's search for stale pending deliveries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:53:46.227631+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clinic_callbacks",
        sa.Column("clinic_id", sa.UUID(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("secret_nonce", sa.LargeBinary(), nullable=False),
        sa.Column("secret_wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinics.id"], name=op.f("fk_clinic_callbacks_clinic_id_clinics"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("clinic_id", name=op.f("pk_clinic_callbacks")),
    )
    op.create_index("ix_clinic_callbacks_kek_id", "clinic_callbacks", ["kek_id"], unique=False)
    op.create_table(
        "callback_deliveries",
        sa.Column("case_id", sa.UUID(), nullable=False),
        sa.Column("clinic_id", sa.UUID(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_http_status", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'cancelled')", name=op.f("ck_callback_deliveries_status")
        ),
        sa.ForeignKeyConstraint(
            ["case_id"], ["cases.id"], name=op.f("fk_callback_deliveries_case_id_cases"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinics.id"], name=op.f("fk_callback_deliveries_clinic_id_clinics"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_callback_deliveries")),
    )
    op.create_index("ix_callback_deliveries_clinic", "callback_deliveries", ["clinic_id", "created_at"], unique=False)
    op.create_index(
        "ix_callback_deliveries_pending",
        "callback_deliveries",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_callback_deliveries_pending",
        table_name="callback_deliveries",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_callback_deliveries_clinic", table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
    op.drop_index("ix_clinic_callbacks_kek_id", table_name="clinic_callbacks")
    op.drop_table("clinic_callbacks")
