"""An index on the cases that clinics' list views showed, for auditors' per-case searches.

"Who saw case X" (``dermq audit search --case``, ``GET /v1/audit/events?case_id=``) reads the case's
own events and every ``case.list`` event whose ``detail.ids`` holds it. The second half had no index
but ``(action, id)``: each search read every list view ever recorded and tested its ids, about 160 ms
for 150,000 list views on a development machine, growing with the log. A partial GIN index
(``jsonb_path_ops``, list views only) answers the same containment test from the index: 0.1 ms there.

The index is built ``CONCURRENTLY``, outside the migration's transaction: the audit table takes
inserts on every audited request, and a plain ``CREATE INDEX`` would block them for as long as the
build takes (about 11 s for those 150,000 list views). An earlier attempt that failed midway leaves an
invalid index of the same name, which ``IF NOT EXISTS`` would keep: it is dropped and built again.
It commits the earlier migrations of the same ``dermq db upgrade`` before it starts, so a failure
here leaves those applied and this one to run again. Downgrade drops the index in the migration's
transaction (a moment's lock): dropped concurrently, it would stay dropped while a failure further
down the same downgrade rolled the version back to 0015, and no upgrade would build it again.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 05:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import online_indexes

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_audit_events_listed_cases"


def upgrade() -> None:
    online_indexes.build({INDEX: "ON audit_events USING gin (detail jsonb_path_ops) WHERE action = 'case.list'"})


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
