"""Fixtures of the core tests: the audit trail's insider set up (:mod:`tests.core.audit_roles`), and the
migration tests' empty database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from cli.db import alembic_config
from core import db_roles
from core.config import Settings
from core.db import dispose_engines
from tests import support
from tests.core.audit_roles import admin_engine


@pytest.fixture
def roles_db(settings: Settings, tmp_path: Path) -> Iterator[dict[str, Settings]]:
    """A database owned by its owner role, migrated by it, with a runtime role granted by it."""
    name = f"{support.TEST_DATABASE}_insider"
    owner, runtime = f"{name}_owner", f"{name}_rt"
    admin = admin_engine(settings)
    support.drop_database(make_url(settings.database_url).set(database=name).render_as_string(False))
    with admin.connect() as connection:
        db_roles.create_roles(connection, owner=owner, runtime=runtime, owner_password=None, runtime_password=None)
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER "{owner}"'))
    base = make_url(settings.database_url).set(database=name)
    as_owner = base.set(username=owner).render_as_string(False)
    as_runtime = base.set(username=runtime).render_as_string(False)
    command.upgrade(alembic_config(as_owner), "head")
    engine = create_engine(as_owner)
    with engine.begin() as connection:
        db_roles.grant_runtime(connection, runtime)
    engine.dispose()
    witness = tmp_path / "witness.log"
    common = {"audit_witness_file": witness}
    try:
        yield {
            "owner": settings.model_copy(update={**common, "database_url": as_owner}),
            "runtime": settings.model_copy(update={**common, "database_url": as_runtime}),
            "superuser": settings.model_copy(update={**common, "database_url": base.render_as_string(False)}),
        }
    finally:
        dispose_engines()
        support.drop_database(base.render_as_string(False))
        with admin.connect() as connection:
            for role in (owner, runtime):
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.fixture
def scratch(settings: Settings) -> Iterator[tuple[Any, Engine]]:
    """An empty database of the test's own (:func:`tests.support.scratch_database`), for a migration test
    that takes it from revision to revision: its Alembic config and an engine on it; dropped afterwards."""
    with support.scratch_database(settings.database_url, "migrations") as made:
        yield made
