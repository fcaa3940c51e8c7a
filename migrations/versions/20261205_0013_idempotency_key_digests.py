"""Idempotency keys stored as keyed digests: a partial index that finds the keys still stored in
plain text.

New cases store ``hmac-sha256:`` and an HMAC of their clinic and key under a key derived from the key
file's pepper (core/idempotency.py), never the key a portal sent. Rows written before keep the plain
key until the sweeper replaces it with its digest (it needs the key file, which migrations do not
have); meanwhile the intake also looks a key up in plain text, so a retry still finds its case.

The index is built ``CONCURRENTLY`` (migrations/online_indexes.py): ``cases`` takes a row for every
submission, and a plain ``CREATE INDEX`` would block them for the build.

Downgrade drops the index. The digests stay: the release before would not find a case by them, so a
retry sent after a downgrade of a case sent before it is stored as a new case.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 00:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_indexes

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    online_indexes.build(
        {"ix_cases_plain_idempotency_key": "ON cases (id) WHERE idempotency_key !~ '^hmac-sha256:[0-9a-f]{64}$'"}
    )


def downgrade() -> None:
    op.drop_index("ix_cases_plain_idempotency_key", table_name="cases")
