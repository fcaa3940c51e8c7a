"""The audit trail's insider, set up: a database owned by an owner role (the migrations) with a
runtime role (the services) as in production (the ``roles_db`` fixture, tests/core/conftest.py), and
events written and sealed as the services do."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine
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
