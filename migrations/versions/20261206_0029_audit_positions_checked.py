"""The Merkle log's positions: a leaf or node at a negative position is refused.

``audit_leaves.seq`` and ``audit_nodes.level`` / ``idx`` had no lower bound. The services' login may
insert leaves (the sealer runs as it), and a leaf at a negative position, naming a just-committed
event, kept that event from ever being sealed while every look that reads positions (the tree's size,
the sealer's place, the checks' walk from position 0) passed over it: the event could then be edited
or removed unnoticed. The constraints close that for every login but the tables' owner; the checks
also name an event whose only leaf lies outside the log (core.audit_verify), which covers an owner
who drops them.

Each constraint is added ``NOT VALID`` (a moment's lock) and then validated, outside the migration's
transaction: validating scans the table under a lock that lets the sealer go on inserting. An
upgrade stopped between the two runs again from the start.

Downgrade drops them.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-06 14:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "ck_audit_leaves_position": ("audit_leaves", "seq >= 0"),
    "ck_audit_nodes_position": ("audit_nodes", "level >= 0 AND idx >= 0"),
}


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, (table, condition) in CHECKS.items():
            op.execute(
                f"""
                DO $$ BEGIN
                    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{name}') THEN
                        ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID;
                    END IF;
                END $$
                """  # noqa: S608 - constant names and conditions
            )
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")


def downgrade() -> None:
    for name, (table, _) in CHECKS.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
