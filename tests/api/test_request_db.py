"""api.db.RequestDb on the real Postgres. A route's last work (``db.run(work, last=True)``) is
committed, or rolled back, in the same hop as the work: its answer comes back only once the commit has
happened, a failed commit is raised in its place, and the connection is back in the pool for the next
request. The request's end then has nothing left to do."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.db import Lanes, RequestDb


@pytest.fixture(scope="module")
def engine(own_database) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    # one connection and no overflow: a request that kept its connection would starve the next one
    engine = create_engine(own_database.database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE notes (note text UNIQUE DEFERRABLE INITIALLY DEFERRED)"))
    yield engine
    engine.dispose()


@pytest.fixture
def lanes() -> Iterator[Lanes]:
    lanes = Lanes()
    yield lanes
    lanes.close()


def notes(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(text("SELECT note FROM notes ORDER BY note")))


def write(*written: str) -> Callable[[Session], str]:
    def work(session: Session) -> str:
        for note in written:
            session.execute(text("INSERT INTO notes VALUES (:note)"), {"note": note})
        return "+".join(written)

    return work


def request(engine: Engine, lanes: Lanes, *steps: tuple[Callable[[Session], Any], bool]) -> dict[str, Any]:
    """One request's database work, step by step (``(work, last)``), then its end as the request
    dependency ends it; what it answered, what others saw right after its last step, and its commits."""
    seen: dict[str, Any] = {"commits": 0, "answers": []}

    def committed(_: Session) -> None:
        seen["commits"] += 1

    async def run() -> None:
        db = RequestDb(sessionmaker(engine), lanes, committed)
        try:
            for work, last in steps:
                seen["answers"].append(await db.run(work, last=last))
            seen["seen_before_the_end"] = notes(engine)  # the pool's one connection is free again
        except BaseException as exc:
            seen["error"] = exc
            await db.finish(commit=False)
            return
        await db.finish(commit=True)

    asyncio.run(run())
    return seen


def test_the_last_work_answers_after_its_commit_and_leaves_the_end_nothing_to_do(engine: Engine, lanes: Lanes) -> None:
    done = request(engine, lanes, (write("a"), False), (write("b"), True))
    assert done["answers"] == ["a", "b"] and "error" not in done
    assert done["seen_before_the_end"] == ["a", "b"]  # both, committed in the last step's hop
    assert done["commits"] == 1  # the end did not commit again
    assert notes(engine) == ["a", "b"]
    # a request that is all one last step
    assert request(engine, lanes, (write("c"), True))["seen_before_the_end"] == ["a", "b", "c"]


def test_a_last_work_that_raises_is_rolled_back_with_everything_before_it(engine: Engine, lanes: Lanes) -> None:
    def fails(session: Session) -> None:
        write("e")(session)
        raise LookupError("no such case")

    done = request(engine, lanes, (write("d"), False), (fails, True))
    assert isinstance(done["error"], LookupError) and done["answers"] == ["d"] and done["commits"] == 0
    assert "d" not in notes(engine) and "e" not in notes(engine)
    assert request(engine, lanes, (write("f"), True))["commits"] == 1  # the connection went back


def test_a_failed_commit_is_raised_instead_of_the_last_work_s_answer(engine: Engine, lanes: Lanes) -> None:
    """As a read whose audit event cannot be committed must not be answered: the constraint is checked
    at the commit, so the work itself succeeds and its answer must still not come back."""
    done = request(engine, lanes, (write("g"), False), (write("h", "h"), True))
    assert isinstance(done["error"], IntegrityError) and done["answers"] == ["g"] and done["commits"] == 0
    assert "g" not in notes(engine) and "h" not in notes(engine)
    assert request(engine, lanes, (write("i"), True))["commits"] == 1


def test_requests_past_the_lanes_limit_are_turned_away_not_given_a_thread_each() -> None:
    """Each request waiting for a database connection held a thread of its own, with no limit: a
    flood of a few thousand requests was a few thousand threads."""
    from core.errors import ServiceUnavailable

    lanes = Lanes(keep=1, most=2)
    try:
        first, second = lanes.take(), lanes.take()
        with pytest.raises(ServiceUnavailable) as busy:
            lanes.take()
        assert busy.value.code == "database_busy" and busy.value.headers["Retry-After"] == "1"
        lanes.give_back(first)
        lanes.discard(second)  # a lane whose Session did not close frees its place too
        assert lanes.take() is first  # the idle one, reused
        lanes.take()
    finally:
        lanes.close()
