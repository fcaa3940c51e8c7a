"""The upload's SHA-256 of every case already purged, overwritten with zeros.

Erasure and retention now overwrite ``cases.image_sha256`` (core.retention): the plain digest of the
upload finds the case from any copy of the photo, in any backup, for good. Cases purged before that
kept it; this overwrites theirs. Nothing reads a purged case's digest (an idempotent replay of a
purged case is refused before it compares images).

Downgrade changes nothing: the digests are gone.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 05:40:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE cases SET image_sha256 = repeat('0', 64) WHERE status = 'purged' AND image_sha256 <> repeat('0', 64)"
    )


def downgrade() -> None:
    pass
