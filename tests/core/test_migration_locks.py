"""Migrations wait for a table's lock no longer than their lock timeout, and each commits on its own.

An upgrade's ``ALTER TABLE`` queued behind a long transaction (a key rewrap, a sweep) held up every
request that needed the table for as long as it waited; and every migration ran in one transaction,
so one that failed undid all those before it. Now it gives up after ``--lock-timeout``, the revisions
before it stay applied, ``dermq db upgrade`` says what happened, and running it again goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from tests import support
from tests.cli.test_commands import run


@pytest.fixture
def scratch(settings) -> Iterator[tuple[Any, Engine]]:  # type: ignore[no-untyped-def]
    with support.scratch_database(settings.database_url, "locks") as made:
        yield made


def revision(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.scalar(text("SELECT version_num FROM alembic_version")))


def test_a_migration_gives_up_on_a_held_table_and_keeps_the_revisions_before_it(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine], settings
) -> None:
    config, engine = scratch
    command.upgrade(config, "0005")
    holder = engine.connect()
    reading = holder.begin()
    holder.execute(text("SELECT count(*) FROM case_blobs"))  # a long transaction that read the table 0007 alters
    try:
        config.attributes["lock_timeout"] = "300ms"
        started = time.monotonic()
        with pytest.raises(OperationalError) as raised:
            command.upgrade(config, "0007")
        assert getattr(raised.value.orig, "pgcode", None) == "55P03"
        assert time.monotonic() - started < 10
        assert revision(engine) == "0006"  # 0006 committed on its own; 0007 waits for a quieter moment

        url = engine.url.render_as_string(hide_password=False)
        said = run(settings.model_copy(update={"database_url": url}), "db", "upgrade", "--lock-timeout", "300ms")
        assert said.returncode == 1 and "after revision 0006" in said.stderr, said.stderr
        assert "Traceback" not in said.stderr
    finally:
        reading.rollback()
        holder.close()
    command.upgrade(config, "head")  # the table free again: the upgrade goes on from 0006
    assert revision(engine) != "0006"


def test_a_lock_timeout_that_is_not_a_duration_is_refused(scratch: tuple[Any, Engine]) -> None:
    config, _ = scratch
    config.attributes["lock_timeout"] = "1s'; DROP TABLE cases; --"
    with pytest.raises(ValueError, match="lock_timeout must be a duration"):
        command.upgrade(config, "0001")
