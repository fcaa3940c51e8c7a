"""core.prepared against the real Postgres: the worker's claim runs as a server-side prepared statement.
What it returns must be what the statement returns (its casts, its modulo, the values it binds itself
written in as literals, the caller's values typed as they were); it is prepared once per connection,
outlives a rolled-back transaction, and a connection that replaced a lost one prepares it again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    bindparam,
    select,
    text,
    update,
)

from core import prepared
from core.config import Settings
from core.db import make_engine
from tests import support


class Upper(TypeDecorator[str]):
    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        return None if value is None else value.upper()


TABLE = Table("numbered", MetaData(), Column("id", Uuid, primary_key=True), Column("n", Integer), Column("tag", Text))
#: odd rows under 100 but one, moved on by a step and tagged: a modulo (``%%`` to the driver), a cast,
#: four values of its own (the modulus, the remainder, the bound, a suffix its type processes) and
#: three of the caller's
STATEMENT = (
    update(TABLE)
    .where(TABLE.c.id != bindparam("skip", type_=Uuid), TABLE.c.n % 2 == 1, TABLE.c.n < 100)
    .values(
        n=TABLE.c.n + bindparam("by", type_=Integer),
        tag=bindparam("tag", type_=Upper()) + bindparam("suffix", "-odd", type_=Upper()),
    )
    .returning(TABLE.c.id, TABLE.c.n)
)


@pytest.fixture
def engine(settings: Settings, database) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    engine = make_engine(settings)
    yield engine
    engine.dispose()


def _numbered(connection: Connection) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(4)]
    connection.execute(text("CREATE TEMP TABLE numbered (id uuid PRIMARY KEY, n integer, tag text)"))
    connection.execute(TABLE.insert(), [{"id": i, "n": n} for n, i in enumerate(ids)])
    return ids


def test_a_prepared_statement_returns_what_the_statement_returns(engine: Engine) -> None:
    claim = prepared.prepare(STATEMENT, engine.dialect, [("skip", "uuid"), ("by", "integer"), ("tag", "text")])
    assert "% 2" in claim.definition.replace("%%", "%") and "< 100" in claim.definition  # its own values
    assert "'-ODD'" in claim.definition
    with engine.connect() as connection:
        ids = _numbered(connection)
        expected = sorted(connection.execute(STATEMENT, {"skip": ids[1], "by": 10, "tag": "a"}).all())
        assert expected == sorted([(ids[3], 13)])  # n = 1 is skipped by id, n = 3 is odd
        prepared.ensure(connection, claim)
        got = connection.execute(claim.execute, {"skip": ids[3], "by": 10, "tag": "b"}).all()
        assert got == [(ids[1], 11)] and isinstance(got[0].id, uuid.UUID)
        rows = connection.execute(select(TABLE.c.n, TABLE.c.tag).order_by(TABLE.c.n)).all()
        assert rows == [(0, None), (2, None), (11, "B-ODD"), (13, "A-ODD")]  # the values, typed


def test_it_is_prepared_once_per_connection_and_again_on_a_new_one(settings: Settings, engine: Engine) -> None:
    claim = prepared.prepare(STATEMENT, engine.dialect, [("skip", "uuid"), ("by", "integer"), ("tag", "text")])
    with support.statements_sent(settings) as sent, engine.connect() as connection:
        ids = _numbered(connection)
        connection.commit()
        with connection.begin() as transaction:
            prepared.ensure(connection, claim)
            transaction.rollback()  # a PREPARE outlives the transaction it was sent in
        for _ in range(2):
            with connection.begin():
                prepared.ensure(connection, claim)
                assert len(connection.execute(claim.execute, {"skip": ids[0], "by": 2, "tag": "t"}).all()) == 2
        connection.invalidate()  # as for a lost connection: the pool opens a new one, which holds nothing
        connection.rollback()
        _numbered(connection)
        prepared.ensure(connection, claim)
        assert len(connection.execute(claim.execute, {"skip": ids[0], "by": 1, "tag": "t"}).all()) == 2
    assert len([s for s in sent if s.startswith("PREPARE ")]) == 2, sent


def test_only_its_own_constants_are_written_into_it(engine: Engine) -> None:
    named = update(TABLE).values(tag=bindparam("tag", type_=Text)).where(TABLE.c.tag == "x'; DROP TABLE t; --é")
    with pytest.raises(ValueError, match="only numbers and ASCII codes"):
        prepared.prepare(named.returning(TABLE.c.id), engine.dialect, [("tag", "text")])
    with pytest.raises(ValueError, match="binds no parameter"):
        prepared.prepare(STATEMENT, engine.dialect, [("nothing", "uuid")])
