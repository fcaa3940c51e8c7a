"""Statements whose results nobody reads, sent in the round trip of the next statement.

psycopg2 sends each ``execute`` as one simple-query message, and Postgres runs every statement of a
message in order, in the transaction it is in. :func:`defer` renders a statement with its parameters
(the driver's own quoting, ``cursor.mogrify``, as psycopg2 does for every statement it sends) and
keeps it on the connection; the next statement executed there carries it in front of its own text,
so it runs first and in the same transaction, with no round trip of its own. What is still pending
when the transaction commits, before a COPY (:mod:`core.pgbinary`) or a savepoint, is sent first, on
its own; a rollback (or a savepoint's) drops it, as Postgres would have undone it.

A round trip is what an idle case waits for at each step: on this project's 2-core VM a statement
to a Postgres backend that was asleep takes 0.3-0.5 ms, most of it waking the process, against
0.1 ms back to back (docs/PERFORMANCE.md). For statements that must happen and whose answer nothing
reads: a lock held until the transaction ends, ``SET LOCAL``, ``pg_notify``.

Only statements that carry no patient data are deferred: a failing one is reported in the text of
the statement it rode with, and error text reaches logs. A rendered statement holding ``%`` is sent
on its own at once (merged, the driver would read it as a placeholder).

This relies on psycopg2 sending parameters inside the statement's text (the simple-query protocol).
A driver that binds them on the server (psycopg 3, asyncpg) takes one statement per message: there,
its pipeline mode is the way to the same saving.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine.interfaces import ExecuteStyle
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from core.driver import driver_cursor

#: the pending statements of a connection, in ``Connection.info`` (which lives with the DBAPI connection)
_PENDING = "dermq.deferred"


def defer(session: Session, statement: str, params: dict[str, Any] | None = None) -> None:
    """Run ``statement`` (psycopg2 ``%(name)s`` parameters) in ``session``'s transaction, in front of
    the next statement that transaction sends (or at its commit). Nothing it returns is read."""
    connection = session.connection()
    rendered = statement
    if params:  # a cursor only to render them: psycopg2 quotes on the cursor, with no round trip
        dbapi_connection: Any = connection.connection.dbapi_connection
        with dbapi_connection.cursor() as cursor:
            rendered = cursor.mogrify(statement, params).decode()
    rendered = rendered.strip().rstrip(";") + ";\n"
    if "%" in rendered:
        _send(connection, rendered)
        return
    connection.info.setdefault(_PENDING, []).append(rendered)


def send(connection: Connection) -> None:
    """Send what is pending on ``connection`` now, in one round trip (before a COPY or a commit)."""
    waiting = connection.info.pop(_PENDING, None)
    if waiting:
        _send(connection, "".join(waiting))


def _send(connection: Connection, sql: str) -> None:
    with driver_cursor(connection, sql) as cursor:
        cursor.execute(sql)  # no parameters: psycopg2 sends the text as it is


def _drop(connection: Connection, *_: Any) -> None:
    if not connection.invalidated:  # an invalidated connection's info went with its DBAPI connection
        connection.info.pop(_PENDING, None)


def _returned(_dbapi_connection: Any, record: Any) -> None:
    """A connection back in its pool (reset by a rollback that no Connection saw) keeps nothing."""
    if record is not None:
        record.info.pop(_PENDING, None)


def _send_first(connection: Connection, *_: Any) -> None:
    if not connection.invalidated:
        send(connection)


@event.listens_for(Engine, "before_cursor_execute", retval=True)
def _carry(
    connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    waiting = connection.info.get(_PENDING)
    if not waiting:
        return statement, parameters
    del connection.info[_PENDING]
    style = getattr(context, "execute_style", ExecuteStyle.EXECUTEMANY if executemany else ExecuteStyle.EXECUTE)
    if style is ExecuteStyle.EXECUTEMANY:  # cursor.executemany would run them once per row
        _send(connection, "".join(waiting))
        return statement, parameters
    return "".join(waiting) + statement, parameters  # one execute (or the first batch of an INSERT's)


event.listen(Engine, "commit", _send_first)
event.listen(Engine, "savepoint", _send_first)
event.listen(Engine, "release_savepoint", _send_first)
event.listen(Engine, "rollback", _drop)
event.listen(Engine, "rollback_savepoint", _drop)
event.listen(Pool, "checkin", _returned)
