"""A clinic's previous callback secret, kept for a while after it registers again.

Registering a callback again rotates its signing secret. Until now the old secret stopped signing at
once, and every callback failed the portal's check until the new secret reached its configuration.
The secrets it replaced now keep signing beside it (more ``v1`` values in ``Dermq-Signature``), each
until its overlap ends (``DERMQ_CALLBACK_SECRET_OVERLAP_HOURS``, 24 by default; core.callback_secrets).
They are sealed, with those ends, in one payload under the same data key as the current secret
(core.crypto.seal_beside), so a key rotation's re-wrap keeps them readable and no other key column is
needed; ``previous_secret_until`` is a copy of the last end, to show and to find expired ones by.

During a rolling upgrade, an API process of the release before that registers a callback leaves
these columns as they were: they no longer open under the new secret's data key, so they sign
nothing, though ``GET /v1/clinic/callback`` may show their end until the next registration or purge.

Downgrade drops the columns: the previous secrets stop signing (as before this release).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 00:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("clinic_callbacks", sa.Column("previous_secret_ciphertext", sa.LargeBinary(), nullable=True))
    op.add_column("clinic_callbacks", sa.Column("previous_secret_nonce", sa.LargeBinary(), nullable=True))
    op.add_column("clinic_callbacks", sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("clinic_callbacks", "previous_secret_until")
    op.drop_column("clinic_callbacks", "previous_secret_nonce")
    op.drop_column("clinic_callbacks", "previous_secret_ciphertext")
