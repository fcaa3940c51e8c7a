"""Clinic names in one spelling and unique whatever their case: existing names are rewritten as
``core.clinics.clinic_name`` now stores new ones (Unicode NFKC, each run of white space one space,
trimmed), so that a lookup by name finds them, and a unique index on ``lower(name)`` keeps "North
Clinic" and "north clinic" from both existing.

The upgrade stops, naming them, if existing clinics' names would then differ only in case (or not at
all): rename all but one of each (its ``name`` in the ``clinics`` table) and upgrade again. Downgrade
drops the index; the names stay in their one spelling.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 21:30:00.000000+00:00
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_clinics_lower_name"


def _spelling(name: str) -> str:
    """The one spelling of a name, as of this migration (a copy: migrations do not change later)."""
    return " ".join(unicodedata.normalize("NFKC", name).split()) or name


def upgrade() -> None:
    bind = op.get_bind()
    names = {row.id: (row.name, _spelling(row.name)) for row in bind.execute(sa.text("SELECT id, name FROM clinics"))}
    together: dict[str, list[str]] = defaultdict(list)
    for stored, spelt in names.values():
        together[spelt.lower()].append(stored)
    clashes = [" / ".join(repr(name) for name in sorted(group)) for group in together.values() if len(group) > 1]
    if clashes:
        raise RuntimeError(
            f"clinic names that would differ only in case or spacing: {'; '.join(sorted(clashes))}. Rename all "
            "but one of each in the clinics table, then upgrade again"
        )
    for clinic_id, (stored, spelt) in names.items():
        if spelt != stored:
            bind.execute(sa.text("UPDATE clinics SET name = :name WHERE id = :id"), {"name": spelt, "id": clinic_id})
    op.create_index(INDEX, "clinics", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="clinics")
