"""Alembic environment: the URL comes from dermq's Settings, the target metadata from core.models.

Each migration commits on its own (``transaction_per_migration``): an upgrade that stops part way
leaves the database at the last revision it finished, and running it again goes on from there.
No migration waits longer than :data:`LOCK_TIMEOUT` for a table's lock: an ``ALTER TABLE`` queued
behind a long transaction (a key rewrap, a sweep) holds up every request that needs that table while
it waits, so it gives up instead (SQLSTATE 55P03; ``dermq db upgrade`` says so), and the upgrade is
run again when the database is quieter. ``-x lock_timeout=30s`` (or the config attribute of the same
name) changes it. A login that may act as the database's owner role without being it (a superuser)
migrates as that role (:func:`core.db_roles.migration_role`): what it creates is the owner's.
"""

from __future__ import annotations

import re

from alembic import context
from sqlalchemy import create_engine, pool

import core.outcome_models  # noqa: F401  (its tables join Base.metadata when it is imported: autogenerate sees them)
from core import db_roles
from core.config import get_settings
from core.models import Base

target_metadata = Base.metadata

#: how long a migration waits for a lock before it gives up (Postgres's units: ms, s, min)
LOCK_TIMEOUT = "10s"
_DURATION = re.compile(r"\d{1,6}(ms|s|min)?")


def database_url() -> str:
    # Tests and tools may pass a URL explicitly (alembic -x url=... or config attribute).
    return (
        context.config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or (get_settings().database_url)
    )


def lock_timeout() -> str:
    chosen = (
        context.config.attributes.get("lock_timeout")
        or context.get_x_argument(as_dictionary=True).get("lock_timeout")
        or LOCK_TIMEOUT
    )
    if not _DURATION.fullmatch(str(chosen)):
        raise ValueError(f"lock_timeout must be a duration such as 10s, 500ms or 2min (got {chosen!r})")
    return str(chosen)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql(f"SET lock_timeout = '{lock_timeout()}'")  # the session's: every migration's
        db_roles.take_migration_role(connection)  # a superuser's run creates the owner's tables (and commits)
        context.configure(
            connection=connection, target_metadata=target_metadata, compare_type=True, transaction_per_migration=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
