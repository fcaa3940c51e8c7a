"""Database errors quote the values of the failing statement, none of that reaches Celery's events; and
a pooled connection the server has closed is not handed out."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from core import db
from core.config import Settings
from core.db import make_engine
from worker.withheld import withheld


def test_what_celery_is_told_of_a_database_error_quotes_no_value(settings: Settings, database) -> None:  # type: ignore[no-untyped-def]
    """Celery puts the error it is given into its task-retried and task-failed events (and so into
    Flower). Postgres's own message quotes the failing value; SQLAlchemy's would list the parameters."""
    marker = "MRN-4417-secret-client-ref"
    engine = make_engine(settings)
    try:
        with engine.connect() as connection, pytest.raises(DBAPIError) as failed:
            connection.execute(text("SELECT CAST(:value AS integer)"), {"value": marker})
    finally:
        engine.dispose()
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(failed.value)
    assert marker in str(failed.value)  # Postgres quotes it: hence what follows
    told = withheld(failed.value)
    assert marker not in str(told) and marker not in repr(told)
    assert "DataError" in str(told)


def _backend_pid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_pooled_connection_the_server_closed_while_idle_is_replaced_not_handed_out(
    settings: Settings, database, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """What a database restart or an administrator's pg_terminate_backend does to a pool: the next
    transaction after an idle spell gets a working connection, not an error."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.2)
    engine = make_engine(settings)
    admin = make_engine(settings)
    try:
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first  # the pool reuses its connection
        with admin.connect() as connection:
            assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}).scalar_one()
        time.sleep(0.3)
        second = _backend_pid(engine)  # pinged on checkout, found dead, replaced
        assert second != first
        assert _backend_pid(engine) == second
    finally:
        engine.dispose()
        admin.dispose()


def test_only_the_transactions_asked_not_to_wait_for_the_disk_commit_without_it(settings: Settings, database) -> None:  # type: ignore[no-untyped-def]
    """``durable=False`` turns off the wait for the WAL flush for that one transaction: the next one on
    the same connection waits again (what every answer to a clinic relies on)."""
    with db.session_scope(settings) as session:
        assert session.scalar(text("SHOW synchronous_commit")) == "on"
    with db.session_scope(settings, durable=False) as session:
        assert session.scalar(text("SHOW synchronous_commit")) == "off"
    engine = make_engine(settings)
    try:
        with engine.connect() as connection, Session(bind=connection) as session:
            db.commit_without_flush(session)
            assert session.scalar(text("SHOW synchronous_commit")) == "off"
            session.commit()
            assert session.scalar(text("SHOW synchronous_commit")) == "on"  # the next transaction, same connection
    finally:
        engine.dispose()


def test_a_burst_above_the_pool_size_waits_for_the_pool_s_connections_instead_of_opening_more(
    settings: Settings, database
) -> None:  # type: ignore[no-untyped-def]
    """Under load a process asks for more connections at once than its pool holds. It must reuse the
    pool's connections: SQLAlchemy's overflow connections are closed as soon as they are returned, so
    every burst started new Postgres backends (a fork, authentication, cold caches), about 9 a second
    from the API under 32 clients. Two bursts of twice the pool size see the same few backends."""
    import contextlib
    import threading

    size = 3
    engine = make_engine(settings.model_copy(update={"database_pool_size": size}))
    seen: set[int] = set()
    lock = threading.Lock()
    held = threading.Barrier(size, timeout=10)

    def one() -> None:
        with engine.connect() as connection:
            pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
            with lock:
                seen.add(pid)
            with contextlib.suppress(threading.BrokenBarrierError):
                held.wait()  # the first ``size`` hold their connections together; the rest queue behind them
            time.sleep(0.05)

    try:
        for _ in range(2):
            threads = [threading.Thread(target=one) for _ in range(2 * size)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            held.reset()
        assert len(seen) == size, f"{len(seen)} backends for a pool of {size}"
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()
