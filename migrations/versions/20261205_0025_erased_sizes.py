"""The exact sizes and input statistics of every case already purged, emptied.

Erasure and retention now set a purged case's image width, height and byte count to 0 and empty its
result's input statistics (brightness and contrast to three decimals; core.retention): with the
upload's SHA-256 gone (0016) they still found the case from a copy of the photo nearly as well.
Cases purged before that kept them; this empties theirs. Nothing reads them for a purged case (the
API shows no image, drift leaves purged cases out).

Downgrade changes nothing: the figures are gone.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 22:30:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE cases SET image_width = 0, image_height = 0, image_bytes = 0 "
        "WHERE status = 'purged' AND (image_width <> 0 OR image_height <> 0 OR image_bytes <> 0)"
    )
    op.execute(
        "UPDATE results SET input_stats = '{}'::jsonb FROM cases "
        "WHERE cases.id = results.case_id AND cases.status = 'purged' AND results.input_stats <> '{}'::jsonb"
    )


def downgrade() -> None:
    pass
