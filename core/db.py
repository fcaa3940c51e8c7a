"""Database engine and sessions.

One transaction per request and per task: callers open :func:`session_scope` (or the API's request
dependency, :mod:`api.db`), services only ``flush()``, and the scope commits at the end or rolls back
on error. Tasks enqueued on the Session (:mod:`core.enqueue`) are sent when it commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings

_engines: dict[str, Engine] = {}


def make_engine(settings: Settings) -> Engine:
    engine = create_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        # Error text never carries bound parameters (labels, probabilities, client references): it
        # reaches logs, Celery's task events and so Flower.
        hide_parameters=True,
        connect_args={
            "connect_timeout": 5,
            "application_name": "dermq",
            "options": (
                f"-c statement_timeout={settings.database_statement_timeout_ms} "
                f"-c lock_timeout={settings.database_lock_timeout_ms} -c timezone=UTC"
            ),
        },
    )
    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for these settings (created on first use)."""
    key = f"{settings.database_url}|{settings.database_lock_timeout_ms}|{settings.database_statement_timeout_ms}"
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(settings)
    return engine


def dispose_engines() -> None:
    """Drop pooled connections: call in a child process after fork (Celery prefork)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
