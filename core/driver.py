"""Statements sent on a session's DBAPI connection directly (a binary COPY, deferred statements):
their driver errors raised as SQLAlchemy's, as from any other statement, so that callers handle them
alike (``OperationalError`` for a lost connection, which invalidates it; ``IntegrityError`` for a
constraint); the API answers them with a problem, a worker retries a transient one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError


@contextmanager
def driver_cursor(connection: Connection, statement: str) -> Iterator[Any]:
    """A cursor of ``connection``'s DBAPI connection (in its transaction), closed on the way out;
    psycopg2's errors inside raised as SQLAlchemy's for ``statement`` (the connection invalidated
    when it is lost)."""
    dbapi_connection: Any = connection.connection.dbapi_connection
    try:
        with dbapi_connection.cursor() as cursor:
            yield cursor
    except psycopg2.Error as exc:
        invalidated = connection.dialect.is_disconnect(exc, dbapi_connection, None)
        if invalidated:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, psycopg2.Error, connection_invalidated=invalidated, dialect=connection.dialect
        ) from None
