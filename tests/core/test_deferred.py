"""Deferred statements (core.deferred): they run in their transaction, in order, in front of the next
statement (no round trip of their own), are sent at a commit or before a COPY when nothing follows,
and vanish with a rollback."""

from __future__ import annotations

import select
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core import deferred, pgbinary
from core.config import Settings
from core.db import make_engine
from tests import support


@pytest.fixture
def engine(settings: Settings, database):  # type: ignore[no-untyped-def]
    made = make_engine(settings.model_copy(update={"database_pool_size": 1}))
    yield made
    made.dispose()


@pytest.fixture
def listener(settings: Settings, database) -> Iterator[tuple[psycopg2.extensions.connection, str]]:  # type: ignore[no-untyped-def]
    """A connection listening on a channel of its own."""
    channel = f"dermq_test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(dbname=make_url(settings.database_url).database)
    connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {channel}")
    yield connection, channel
    connection.close()


def _heard(connection: psycopg2.extensions.connection, timeout: float = 1.0) -> list[str]:
    select.select([connection], [], [], timeout)
    connection.poll()
    payloads = [notice.payload for notice in connection.notifies]
    connection.notifies.clear()
    return payloads


def test_a_deferred_statement_runs_first_in_the_round_trip_of_the_next(settings: Settings, engine, listener) -> None:  # type: ignore[no-untyped-def]
    connection, channel = listener
    with support.statements_sent(settings) as sent, Session(bind=engine) as session:
        deferred.defer(session, "SET LOCAL lock_timeout TO '1234ms'")
        deferred.defer(session, "SELECT pg_notify(%(channel)s, %(payload)s)", {"channel": channel, "payload": "one"})
        assert sent == []  # nothing sent yet
        assert session.scalar(text("SHOW lock_timeout")) == "1234ms"  # after the SET, in its transaction
        assert len(sent) == 1 and sent[0].startswith("SET LOCAL lock_timeout"), sent
        assert _heard(connection, timeout=0.2) == []  # a notification waits for the commit
        session.commit()
        assert session.scalar(text("SHOW lock_timeout")) != "1234ms"  # SET LOCAL: that transaction only
    assert _heard(connection) == ["one"]


def test_what_is_pending_at_a_commit_is_sent_and_a_rollback_drops_it(settings: Settings, engine, listener) -> None:  # type: ignore[no-untyped-def]
    connection, channel = listener
    notify = "SELECT pg_notify(%(channel)s, %(payload)s)"
    with Session(bind=engine) as session:
        deferred.defer(session, notify, {"channel": channel, "payload": "kept"})
        session.commit()  # nothing else ran in that transaction
        assert _heard(connection) == ["kept"]

        deferred.defer(session, notify, {"channel": channel, "payload": "dropped"})
        session.rollback()
        with support.statements_sent(settings) as sent:
            session.execute(text("SELECT 1"))  # the next transaction on the same connection carries nothing
        assert sent == ["SELECT 1"], sent
        session.commit()
    assert _heard(connection, timeout=0.3) == []

    with Session(bind=engine) as session:  # closed without a commit: gone too
        deferred.defer(session, notify, {"channel": channel, "payload": "closed"})
    with Session(bind=engine) as session:
        session.execute(text("SELECT 1"))
        session.commit()
    assert _heard(connection, timeout=0.3) == []


def test_a_rolled_back_savepoint_drops_what_was_deferred_inside_it(engine, listener) -> None:  # type: ignore[no-untyped-def]
    connection, channel = listener
    notify = "SELECT pg_notify(%(channel)s, %(payload)s)"
    with Session(bind=engine) as session:
        deferred.defer(session, notify, {"channel": channel, "payload": "before"})
        savepoint = session.begin_nested()  # what was deferred before it is sent first
        deferred.defer(session, notify, {"channel": channel, "payload": "inside"})
        savepoint.rollback()
        session.commit()
    assert _heard(connection) == ["before"]


def test_a_copy_sends_what_is_pending_first(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    with Session(bind=engine) as session:
        deferred.defer(session, "SET LOCAL application_name TO 'deferred-before-copy'")
        rows = pgbinary.copy_out(session, "SELECT current_setting('application_name')", {}, ["text"])
        assert rows == [("deferred-before-copy",)]
        with support.statements_sent(settings) as sent:  # sent once: nothing left for the next statement
            session.execute(text("SELECT 1"))
        assert sent == ["SELECT 1"], sent


def test_a_statement_holding_a_percent_sign_is_sent_at_once(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    """Merged into another statement, the driver would read its % as the start of a placeholder."""
    with Session(bind=engine) as session:
        deferred.defer(session, "SET LOCAL application_name TO %(name)s", {"name": "50% off"})
        with support.statements_sent(settings) as sent:  # already sent: the next statement carries nothing
            assert session.scalar(text("SELECT current_setting('application_name')")) == "50% off"
        assert sent == ["SELECT current_setting('application_name')"], sent


def test_a_deferred_statement_that_fails_at_the_commit_fails_it_as_sqlalchemy_s_error(engine) -> None:  # type: ignore[no-untyped-def]
    """What callers handle (the API's problems, a worker's retries) is SQLAlchemy's exceptions, never
    the driver's; and the transaction is not committed."""
    from sqlalchemy.exc import DBAPIError

    with Session(bind=engine) as session:
        session.execute(text("CREATE TEMP TABLE deferred_probe (x int)"))
        session.commit()
        session.execute(text("INSERT INTO deferred_probe VALUES (1)"))
        deferred.defer(session, "SELECT 1 / 0")
        with pytest.raises(DBAPIError):
            session.commit()
        session.rollback()
        assert session.scalar(text("SELECT count(*) FROM deferred_probe")) == 0
