"""Indexes built ``CONCURRENTLY``, for migrations that add one to a table the running stack writes.

A plain ``CREATE INDEX`` blocks every write to its table for the build. A concurrent build blocks
none, but cannot run in a transaction: it runs outside the migration's (committing the earlier
migrations of the same upgrade first), and waits for every older transaction of the database (a
backup's, say), so the upgrade's lock timeout (migrations/env.py) is lifted for it and restored
after. An index a failed build left invalid is dropped and built again.

Migrations that were applied long ago call this too: change it only in ways that build the same
indexes, or a database made from scratch would differ from one that was upgraded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import context, op

# no row (None) when there is no such index
_INVALID = sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")


def build(indexes: Mapping[str, str], *, then_drop: Sequence[str] = ()) -> None:
    """``CREATE INDEX CONCURRENTLY IF NOT EXISTS name definition`` for each of ``indexes``; then ``DROP
    INDEX CONCURRENTLY IF EXISTS`` each of ``then_drop`` (an index a new one replaces)."""
    with op.get_context().autocommit_block():
        online = not context.is_offline_mode()
        before = op.get_bind().execute(sa.text("SHOW lock_timeout")).scalar() if online else None
        op.execute("SET lock_timeout = 0")
        for name, definition in indexes.items():
            if online and op.get_bind().execute(_INVALID, {"name": name}).scalar():
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")
        for name in then_drop:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        if before is not None:  # the migrations after this one wait no longer than the upgrade said
            op.get_bind().execute(sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": before})
