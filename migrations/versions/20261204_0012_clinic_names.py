"""Clinic names in one spelling and unique whatever their case: existing names are rewritten as
``core.clinics.clinic_name`` now stores new ones (Unicode NFKC, each run of white space one space,
trimmed), so that a lookup by name finds them, and a unique index on ``lower(name)`` keeps "North
Clinic" and "north clinic" from both existing.

The upgrade stops, naming them, if existing clinics' names would then differ only in case (or not at
all), would be over 200 characters, or read as a clinic id (a UUID: lookups take those as ids):
rename them (``name`` in the ``clinics`` table) and upgrade again. It reads the names, so it runs
against a database, not in offline (``--sql``) mode. Downgrade drops the index; the names stay in
their one spelling.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 21:30:00.000000+00:00
"""

from __future__ import annotations

import unicodedata
import uuid
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_clinics_lower_name"
RENAME = sa.text("UPDATE clinics SET name = :name WHERE id = CAST(:id AS uuid)")
CLASHES = sa.text("SELECT array_agg(id::text) FROM clinics GROUP BY lower(name) HAVING count(*) > 1")


def _spelling(name: str) -> str:
    """The one spelling of a name, as of this migration (a copy: migrations do not change later)."""
    return " ".join(unicodedata.normalize("NFKC", name).split()) or name


def _reads_as_id(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def upgrade() -> None:
    if context.is_offline_mode():
        raise RuntimeError("migration 0012 rewrites clinic names it reads: run it against the database, not as SQL")
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id::text AS id, name FROM clinics"))
    names = {row.id: (row.name, _spelling(row.name)) for row in rows}
    together: dict[str, list[str]] = defaultdict(list)
    for stored, spelt in names.values():
        together[spelt].append(stored)
    problems = [" / ".join(repr(name) for name in sorted(group)) for group in together.values() if len(group) > 1]
    for stored, spelt in names.values():
        if len(spelt) > 200:
            problems.append(f"{stored!r} (over 200 characters in one spelling)")
        if _reads_as_id(spelt):
            problems.append(f"{stored!r} (reads as a clinic id)")
    if not problems:
        for clinic_id, (stored, spelt) in names.items():
            if spelt != stored:
                bind.execute(RENAME, {"name": spelt, "id": clinic_id})
        # Postgres's lower() decides what the index takes for one name, so it decides the clashes too
        problems = [
            " / ".join(sorted(repr(names[clinic_id][0]) for clinic_id in group)) for (group,) in bind.execute(CLASHES)
        ]
    if problems:  # this migration rolls back (those before it stay applied): no name is rewritten
        raise RuntimeError(
            f"clinic names to rename first: {'; '.join(sorted(problems))}. Names that would differ only in case or "
            "spacing clash. Rename all but one of each (and any other listed) in the clinics table, then upgrade again"
        )
    op.create_index(INDEX, "clinics", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="clinics")
