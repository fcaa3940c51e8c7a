"""Statements sent on a session's DBAPI connection directly (a binary COPY, deferred statements):
their driver errors raised as SQLAlchemy's, as from any other statement, so that callers handle them
alike (``OperationalError`` for a lost connection, which invalidates it; ``IntegrityError`` for a
constraint); the API answers them with a problem, a worker retries a transient one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError


@contextmanager
def driver_errors(connection: Connection, statement: str) -> Iterator[None]:
    """Raise psycopg2's errors inside as SQLAlchemy's (the connection invalidated when it is lost)."""
    try:
        yield
    except psycopg2.Error as exc:
        dbapi_connection = connection.connection.dbapi_connection
        invalidated = connection.dialect.is_disconnect(exc, dbapi_connection, None)
        if invalidated:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, psycopg2.Error, connection_invalidated=invalidated, dialect=connection.dialect
        ) from None
