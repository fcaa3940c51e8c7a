"""The audit trail's insider, set up: a database owned by an owner role (the migrations) with a
runtime role (the services) as in production (the ``roles_db`` fixture, tests/core/conftest.py), and
events written and sealed as the services do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

from core import audit, checkpoint
from core.config import Settings
from core.db import session_scope
from tests import support


def admin_engine(settings: Settings):  # type: ignore[no-untyped-def]
    return create_engine(make_url(settings.database_url).set(database="postgres"), isolation_level="AUTOCOMMIT")


def record_and_seal(settings: Settings, keys: checkpoint.SigningKeys, n: int) -> list[int]:
    """n events, each sealed (and so checkpointed and witnessed) on its own, by the runtime role."""
    ids = []
    for i in range(n):
        with session_scope(settings) as session:
            event_id = audit.record(
                session,
                action="case.read",
                outcome=audit.SUCCESS,
                actor=audit.SYSTEM,
                entity_type="case",
                entity_id=str(uuid.uuid4()),
                detail={"i": i},
            )
            ids.append(event_id)
        support.seal_all(settings)
    return ids


@contextmanager
def unguarded(owner: Settings, *tables: str) -> Iterator[Connection]:
    """A transaction of the owner's login with the append-only triggers of ``tables`` disabled, as an
    insider who owns the tables would rewrite them (committed at the end)."""
    engine = create_engine(owner.database_url)
    try:
        with engine.begin() as connection:
            for table in tables:
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only"))
            yield connection
    finally:
        engine.dispose()
