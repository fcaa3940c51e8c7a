"""Database engine and sessions.

One transaction per request and per task: callers open :func:`session_scope` (or the API's request
dependency, :mod:`api.db`), services only ``flush()``, and the scope commits at the end or rolls back
on error. Tasks enqueued on the Session (:mod:`core.enqueue`) are sent when it commits.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from core import deferred
from core.config import Settings

_engines: dict[tuple[object, ...], Engine] = {}
_factories: dict[Engine, sessionmaker[Session]] = {}

#: A pooled connection that has sat unused for longer than this is tested with a round trip before
#: it is handed out (a database restart, a failover or a server-side idle timeout may have closed
#: it); one returned to the pool moments ago is not.
PING_AFTER_IDLE_S = 1.0
#: when each engine's pool last had a connection given back (time.monotonic()): a full pool that
#: still gives connections back is busy; one that has given none back for seconds waits on a database
#: that does not answer (the API's readiness tells the two apart)
_last_returned: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def seconds_since_a_connection_was_returned(engine: Engine) -> float | None:
    """How long ago ``engine``'s pool last had a connection given back (None: never)."""
    returned = _last_returned.get(engine)
    return None if returned is None else time.monotonic() - returned


def _ping_idle_connections(engine: Engine) -> None:
    """SQLAlchemy's ``pool_pre_ping`` tests every checkout with ``SELECT 1``: under load that was 6-7%
    of the API's and the worker's CPU, a round trip before every transaction, on connections used
    milliseconds earlier. This tests only connections idle for :data:`PING_AFTER_IDLE_S`, the ones a
    restart can have closed unnoticed; one found dead is discarded and the pool connects afresh
    (raising ``DisconnectionError`` from a checkout listener, as SQLAlchemy's disconnect-handling
    guide describes). A connection that dies while in use still fails that transaction, which then
    invalidates the whole pool (SQLAlchemy's own disconnect detection), as with ``pool_pre_ping``."""
    dbapi_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        record.info["dermq_returned_at"] = _last_returned[engine] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get("dermq_returned_at")
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE_S:
            return  # just connected, or in use a moment ago
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except dbapi_error as error:
            raise exc.DisconnectionError("a pooled connection idle since its last use no longer answers") from error


def make_engine(settings: Settings) -> Engine:
    """An engine for ``settings``."""
    engine = create_engine(
        settings.database_url,
        # Every connection the pool opens is kept: no overflow. SQLAlchemy closes an overflow
        # connection as soon as it is returned to a full pool, so bursts above the pool size made a
        # Postgres backend per burst (a fork, authentication and cold catalog and plan caches for
        # the statements it ran): under 32 concurrent clients the API opened about 9 a second, and
        # keeping them cut Postgres's CPU per case by about a fifth (docs/PERFORMANCE.md). A
        # request that finds every connection in use waits for one, for database_pool_timeout_s.
        pool_size=settings.database_pool_size,
        max_overflow=0,
        pool_timeout=settings.database_pool_timeout_s,
        pool_recycle=1800,  # and connections idle for a second are pinged first: _ping_idle_connections
        # Error text never carries bound parameters (labels, probabilities, client references): it
        # reaches logs, Celery's task events and so Flower.
        hide_parameters=True,
        connect_args={
            "connect_timeout": 5,
            # A peer that vanished (a failover to another address, a dead link) is noticed in about
            # a minute, not the kernel's 15: the statement timeout is the server's, and cannot end a
            # wait on a server that is gone
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "application_name": "dermq",
            "options": (
                f"-c statement_timeout={settings.database_statement_timeout_ms} "
                f"-c lock_timeout={settings.database_lock_timeout_ms} -c timezone=UTC"
            ),
        },
    )
    _ping_idle_connections(engine)
    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for these settings (created on first use)."""
    key = (
        settings.database_url,
        settings.database_lock_timeout_ms,
        settings.database_statement_timeout_ms,
        settings.database_pool_size,
        settings.database_pool_timeout_s,
    )
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(settings)
    return engine


def dispose_engines() -> None:
    """Drop pooled connections: call in a child process after fork (Celery prefork)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _factories.clear()


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """The process-wide session factory for these settings' engine. Made once per engine: each
    ``sessionmaker`` defines a Session subclass of its own, whose first use builds SQLAlchemy's
    event dispatch for the class, about 1 ms of CPU; made per transaction, that was a twentieth of
    a worker's CPU per case."""
    engine = get_engine(settings)
    factory = _factories.get(engine)
    if factory is None:
        factory = _factories[engine] = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    return factory


@contextmanager
def session_scope(settings: Settings, *, durable: bool = True) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception; with
    ``durable=False`` its commit does not wait for the disk (:func:`commit_without_flush`, whose
    ``SET LOCAL`` rides with the transaction's first statement: no round trip of its own)."""
    session = session_factory(settings)()
    try:
        if not durable:
            commit_without_flush(session)
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def commit_without_flush(session: Session) -> None:
    """Let ``session``'s transaction commit without waiting for its WAL to reach the disk (Postgres's
    asynchronous commit, ``SET LOCAL synchronous_commit = off``): the commit takes 0.1-0.5 ms instead
    of waiting for a flush (0.6-4 ms on this project's VMs). Visibility, locking and constraints are unchanged; a
    Postgres crash within about 0.6 s (3 x ``wal_writer_delay``) may lose the transaction, never
    corrupt anything, and any later durable commit of any session makes it durable too (the WAL is
    one sequence, flushed in order).

    For work that is redone when it is lost and about which nobody is told anything before a durable
    commit follows: a worker's claim and its results (a lost claim leaves the case queued for the
    sweeper, a lost result leaves it running until the sweeper requeues it and it is classified
    again; the API answers a clinic, a callback is sent and the audit sealer signs a checkpoint only
    after a durable commit of their own, which flushes the result with them), and a case created by a
    submission that waits for its result (the answer follows the durable commit of its audited read,
    or, when the database is too busy for that read, of :func:`core.cases.confirm_stored`: never a
    202 on this commit alone). See docs/OPERATIONS.md, "Durability".

    A durable commit flushes the WAL only if its transaction wrote some: one that wrote nothing, even
    with a transaction id, commits without waiting for the disk whatever ``synchronous_commit`` says
    (PostgreSQL's ``RecordTransactionCommit``)."""
    deferred.defer(session, "SET LOCAL synchronous_commit TO OFF")  # sent with the next statement


def commit_durably(session: Session) -> None:
    """Undo :func:`commit_without_flush` for the rest of ``session``'s transaction: its commit waits
    for the disk again (Postgres's default)."""
    deferred.defer(session, "SET LOCAL synchronous_commit TO ON")
