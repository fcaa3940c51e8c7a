"""Clinic names unique whatever their case: a unique index on ``lower(name)``, so that "North Clinic"
and "north clinic" cannot both exist (``core.clinics.clinic_name`` normalises new names too).

The upgrade stops, naming them, if existing clinics' names differ only in case: rename one first
(its ``name`` in the ``clinics`` table). Downgrade drops the index.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 21:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_clinics_lower_name"


def upgrade() -> None:
    clashes = op.get_bind().execute(
        sa.text("SELECT string_agg(name, ' / ' ORDER BY name) FROM clinics GROUP BY lower(name) HAVING count(*) > 1")
    )
    names = [row[0] for row in clashes]
    if names:
        raise RuntimeError(
            f"clinic names that differ only in case: {'; '.join(names)}. Rename all but one of each in the "
            "clinics table, then upgrade again"
        )
    op.create_index(INDEX, "clinics", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="clinics")
