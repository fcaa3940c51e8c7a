"""Server-side prepared statements, for a statement built once and sent for every unit of work: it is
PREPAREd once on each database connection and then sent as ``EXECUTE name(values)``.

Postgres parses, analyses, rewrites and plans every plain statement it is sent. For the worker's claim
(two CTEs, the pixel arithmetic, an UPDATE returning every column: about 3 KB of SQL) that is paid at
every batch, an idle case's included. Prepared, the text crosses the wire and is analysed once per
connection, and after five executions Postgres may keep a generic plan (``plan_cache_mode``): the claim
took 1.6-1.8 ms instead of 2.6-2.8 ms of wall time at idle on this project's 2-core VM
(docs/PERFORMANCE.md).

A prepared statement lives as long as its connection's session, and survives the rollback of the
transaction that prepared it. Which names a connection holds is kept in its pool entry's ``info``,
which SQLAlchemy clears when it replaces a lost connection. Not for a transaction-pooling proxy
(PgBouncer in transaction mode) in front of the workers or the API, which would hand the session to
others. A migration that changes the type of a column a prepared statement returns makes Postgres
refuse it on every connection that prepared it ("cached plan must not change result type") until
the pool replaces the connection: docs/OPERATIONS.md, "Every release".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2.extensions import adapt
from sqlalchemy import Connection, Dialect, TextualSelect, bindparam, text

#: Key of a connection's ``info``: the names of the statements prepared on it.
_PREPARED = "dermq_prepared"
_PYFORMAT = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement to PREPARE (``definition``) and to run by name (``execute``, binding the values
    its caller gives at each execution, and returning the statement's columns)."""

    name: str
    definition: str
    execute: TextualSelect


def prepare(statement: Any, dialect: Dialect, parameters: Sequence[tuple[str, str]]) -> Prepared:
    """``statement`` (one that returns rows) as a prepared statement: ``parameters`` (each its bound
    parameter's name and Postgres type) become ``$1``, ``$2``, ..., bound at each execution; every
    other value it binds itself is written into the definition as a literal, processed by its type.

    Those literals are the statement's own constants (numbers, codes), never a caller's input. The
    name is the definition's digest, so the statements built for different bounds coexist."""
    if dialect.paramstyle != "pyformat":
        raise ValueError(f"prepare reads psycopg2's pyformat parameters, not {dialect.paramstyle}")
    compiled = statement.compile(dialect=dialect)
    sql = str(compiled)
    if "POSTCOMPILE" in sql:
        raise ValueError("a statement with parameters expanded at execution cannot be prepared")
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    positions = {name: f"${i}" for i, (name, _) in enumerate(parameters, 1)}
    if missing := set(positions) - set(binds):
        raise ValueError(f"the statement binds no parameter {sorted(missing)}")

    def literal(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in positions:
            return positions[name]
        bind = binds[name]
        process = bind.type.bind_processor(dialect)  # as the driver would be given it (a TypeDecorator's)
        value = process(bind.effective_value) if process is not None else bind.effective_value
        if not isinstance(value, (int, float, str)) or (isinstance(value, str) and not value.isascii()):
            raise ValueError(f"{name}: only numbers and ASCII codes are written into a prepared statement")
        return str(adapt(value).getquoted().decode("ascii")).replace("%", "%%")

    body = _PYFORMAT.sub(literal, sql)
    types = ", ".join(kind for _, kind in parameters)
    name = "dermq_" + hashlib.sha256(f"({types}) {body}".encode()).hexdigest()[:16]
    definition = f"PREPARE {name} ({types}) AS {body}"
    typed = [bindparam(p, type_=binds[p].type) for p, _ in parameters]
    call = text(f"EXECUTE {name}({', '.join(f':{p}' for p, _ in parameters)})").bindparams(*typed)
    return Prepared(name, definition, call.columns(*statement.exported_columns))


def ensure(connection: Connection, prepared: Prepared) -> None:
    """PREPARE ``prepared`` on ``connection`` unless it already holds it (one round trip, once per
    connection: the next :attr:`Prepared.execute` on it finds it)."""
    held: set[str] = connection.connection.info.setdefault(_PREPARED, set())
    if prepared.name not in held:
        connection.exec_driver_sql(prepared.definition)
        held.add(prepared.name)
