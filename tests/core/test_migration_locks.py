"""Migrations wait for a table's lock no longer than their lock timeout, and each commits on its own.

An upgrade's ``ALTER TABLE`` queued behind a long transaction (a key rewrap, a sweep) held up every
request that needed the table for as long as it waited; and every migration ran in one transaction,
so one that failed undid all those before it. Now it gives up after ``--lock-timeout``, the revisions
before it stay applied, ``dermq db upgrade`` says what happened, and running it again goes on."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from tests import support
from tests.cli.test_commands import run


def revision(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.scalar(text("SELECT version_num FROM alembic_version")))


def test_a_migration_gives_up_on_a_held_table_and_keeps_the_revisions_before_it(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine], settings
) -> None:
    config, engine = scratch
    command.upgrade(config, "0005")
    holder = engine.connect()
    # should the timeout ever be lost, the upgrade gets the table after 20 s and the test fails, not hangs
    holder.execute(text("SET idle_in_transaction_session_timeout = '20s'"))
    holder.commit()
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


def build_waits(engine: Engine) -> bool:
    """Whether a CREATE INDEX CONCURRENTLY waits for a lock (a connection of its own each time: a
    transaction sees pg_stat_activity as it was when it first read it)."""
    with engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' "
                    "AND wait_event_type = 'Lock'"
                )
            )
        )


def test_a_concurrent_index_build_waits_for_older_transactions_whatever_the_lock_timeout(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine],
) -> None:
    """0015 builds its index with CREATE INDEX CONCURRENTLY, which waits for every older transaction
    that writes the table (blocking no request meanwhile): the upgrade's lock timeout must not end it
    (a backup running, and the upgrade failed with an invalid index left behind)."""
    config, engine = scratch
    command.upgrade(config, "0014")
    config.attributes["lock_timeout"] = "300ms"
    holder = engine.connect()
    writing = holder.begin()
    holder.execute(text("LOCK TABLE audit_events IN ROW EXCLUSIVE MODE"))  # as a transaction writing events holds
    failed: list[BaseException] = []

    def upgrade() -> None:
        try:
            command.upgrade(config, "0015")
        except BaseException as exc:
            failed.append(exc)

    building = threading.Thread(target=upgrade)
    building.start()
    try:
        support.wait_for(lambda: failed or build_waits(engine), timeout=30, what="the index build to wait")
        assert not failed, failed
        time.sleep(0.6)  # twice the lock timeout: the build must still be waiting, not failed
        assert not failed and build_waits(engine), failed
    finally:
        writing.rollback()
        holder.close()
        building.join(60)
    assert not failed, failed
    assert revision(engine) == "0015"
    with engine.connect() as connection:
        valid = connection.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_audit_events_listed_cases'::regclass")
        )
    assert valid is True
