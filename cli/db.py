"""``dermq db``: create the database, run the migrations. Owns the Alembic wiring: the migrations are the
installed ``migrations`` package, so ``dermq db upgrade`` needs no ``alembic.ini`` wherever dermq runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.config import get_settings


def alembic_config(database_url: str) -> Any:
    """Alembic's configuration for the installed migrations package (no alembic.ini needed)."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    config.attributes["url"] = database_url
    return config


@click.group(help="database")
def db() -> None:
    pass


@db.command("create", help="create the database if missing")
def create() -> int:
    """Create the database named in DERMQ_DATABASE_URL if it does not exist."""
    url = make_url(get_settings().database_url)
    name = url.database
    if not name:
        click.echo("error: DERMQ_DATABASE_URL names no database", err=True)
        return 2
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name})
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
                click.echo(f"created database {name}")
            else:
                click.echo(f"database {name} exists")
    finally:
        admin.dispose()
    return 0


@db.command("upgrade", help="run the migrations")
def upgrade() -> int:
    from alembic import command

    command.upgrade(alembic_config(get_settings().database_url), "head")
    return 0
