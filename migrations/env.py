"""Alembic environment: the URL comes from dermq's Settings, the target metadata from core.models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from core.config import get_settings
from core.models import Base

target_metadata = Base.metadata


def database_url() -> str:
    # Tests and tools may pass a URL explicitly (alembic -x url=... or config attribute).
    return (
        context.config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or (get_settings().database_url)
    )


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
