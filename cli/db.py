"""``dermq db``: create the database, run the migrations, set up the owner and runtime roles.

Owns the Alembic wiring: the migrations are the installed ``migrations`` package, so ``dermq db
upgrade`` needs no ``alembic.ini`` wherever dermq runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core import db_roles
from core.config import get_settings


def alembic_config(database_url: str) -> Any:
    """Alembic's configuration for the installed migrations package (no alembic.ini needed)."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    config.attributes["url"] = database_url
    return config


#: Postgres's SQLSTATE for a lock not granted within lock_timeout
LOCK_NOT_AVAILABLE = "55P03"


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


def _revision(database_url: str) -> str | None:
    """The Alembic revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def _migration_role(database_url: str) -> str | None:
    """The owner role the migrations will take instead of this login (core/db_roles.py), or None."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return db_roles.migration_role(connection)
    finally:
        engine.dispose()


@db.command("upgrade", help="run the migrations (as the owner role); then grant the runtime role, if one is set")
@click.option(
    "--lock-timeout",
    default="10s",
    show_default=True,
    help="how long a migration waits for a table's lock before it gives up (others wait behind it meanwhile)",
)
def upgrade(lock_timeout: str) -> int:
    from alembic import command
    from sqlalchemy.exc import OperationalError

    settings = get_settings()
    before = _revision(settings.database_url)
    role = _migration_role(settings.database_url)
    if role is not None:
        click.echo(f"migrating as {role}, the database's owner, which this login may act as")
    config = alembic_config(settings.database_url)
    config.attributes["lock_timeout"] = lock_timeout
    try:
        command.upgrade(config, "head")
    except OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
            raise
        reached = _revision(settings.database_url)
        click.echo(
            f"error: a migration after revision {reached} waited {lock_timeout} for a table another transaction "
            "holds, and gave up so that the requests behind it need not wait; the revisions before it are "
            "applied. Run `dermq db upgrade` again when the database is quieter (or with a longer --lock-timeout)",
            err=True,
        )
        return 1
    after = _revision(settings.database_url)
    name = make_url(settings.database_url).database
    if before == after:
        click.echo(f"database {name} is at the latest revision ({after}); nothing to do")
    else:
        click.echo(f"database {name} upgraded from revision {before or 'none (empty)'} to {after}")
    if settings.database_runtime_role:  # least privilege for the services (core/db_roles.py)
        click.echo(db_roles.grant(settings, settings.database_runtime_role))
    return 0


def _read(path: Path | None) -> str | None:
    return path.read_text().strip() if path else None


@db.command("roles", help="create the owner and runtime login roles (as a superuser)")
@click.option("--owner", required=True, help="the role that owns the tables and runs migrations")
@click.option("--runtime", required=True, help="the role the services log in as")
@click.option("--owner-password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--runtime-password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def roles(owner: str, runtime: str, owner_password_file: Path | None, runtime_password_file: Path | None) -> int:
    message = db_roles.set_up_roles(
        get_settings(),
        owner=owner,
        runtime=runtime,
        owner_password=_read(owner_password_file),
        runtime_password=_read(runtime_password_file),
    )
    click.echo(message)
    return 0


@db.command("grant", help="grant the runtime role its privileges (as the owner, after upgrades)")
@click.option("--runtime", required=True, help="the role the services log in as")
def grant(runtime: str) -> int:
    click.echo(db_roles.grant(get_settings(), runtime))
    return 0
