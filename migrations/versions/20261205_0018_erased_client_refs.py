"""What erased cases still held of their patient data, shredded: a client reference in plain text,
and any blob.

A purge did not empty ``cases.client_ref`` (the reference stored in plain text before migration 0007)
until a later release, and no migration emptied it for the cases purged before: their answers showed
the reference again (``status: purged`` beside a medical record number), the sweeper then sealed it
into a new blob under the case's period key, which kept that key from ever being destroyed (a stray
blob), and a second erasure found nothing to do. A blob a race left on a purged case did the same.
This empties those columns and deletes those blobs; :mod:`core.phi` no longer seals a purged case's
reference and an erasure of a purged case shreds whatever is left (:mod:`core.retention`).

Downgrade changes nothing: the references are gone.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 10:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # the partial index on client_ref (ix_cases_plain_client_ref) answers the first; purged cases
    # have no blob but for such leftovers
    op.execute("UPDATE cases SET client_ref = NULL WHERE client_ref IS NOT NULL AND status = 'purged'")
    op.execute("DELETE FROM case_blobs WHERE case_id IN (SELECT id FROM cases WHERE status = 'purged')")


def downgrade() -> None:
    pass
