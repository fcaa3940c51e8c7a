"""CHECK constraints added to a table the running stack writes without holding the table for a scan.

``ALTER TABLE ... ADD CONSTRAINT ... CHECK`` scans the table under ACCESS EXCLUSIVE: no request reads
or writes it until the scan ends. Added ``NOT VALID``, the constraint takes that lock for a moment and
checks new rows only; ``VALIDATE CONSTRAINT`` then scans the rows already there under a lock that lets
requests read and write (as 0029 does). Both run outside the migration's transaction, which would
otherwise hold the first lock through the scan: the earlier migrations of the same upgrade commit
first, and an upgrade stopped between the two steps runs again from the start (a constraint already
added is validated, not added twice).

A constraint replaced (a longer list of blob kinds) is added beside the old one under a temporary
name and validated; the old one is then dropped and the new one renamed in the migration's
transaction. A check is in force throughout, and the result is the constraint a plain ``ADD
CONSTRAINT`` made. Downgrades replace theirs in their own transaction, so that one that fails leaves
nothing changed.

Migrations that were applied long ago call this: change it only in ways that make the same
constraints, or a database made from scratch would differ from one that was upgraded.
"""

from __future__ import annotations

from collections.abc import Mapping

from alembic import op

#: the temporary name's suffix for a replacement, while the constraint it replaces is in force
REPLACEMENT = "_next"


def add(checks: Mapping[str, tuple[str, str]]) -> None:
    """Add each ``name: (table, condition)`` ``NOT VALID`` where missing, and validate it."""
    with op.get_context().autocommit_block():
        for name, (table, condition) in checks.items():
            op.execute(
                f"""
                DO $$ BEGIN
                    IF NOT EXISTS (
                        SELECT 1 FROM pg_constraint WHERE conrelid = '{table}'::regclass AND conname = '{name}'
                    ) THEN
                        ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID;
                    END IF;
                END $$
                """  # noqa: S608 - constant names and conditions
            )
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")


def replace(checks: Mapping[str, tuple[str, str]]) -> None:
    """Replace each CHECK constraint ``name: (table, condition)`` with one of the new condition."""
    add({name + REPLACEMENT: (table, condition) for name, (table, condition) in checks.items()})
    for name, (table, _) in checks.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {name}{REPLACEMENT} TO {name}")
