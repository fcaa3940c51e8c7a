"""Migration 0020 (the field tally by month) on a database of its own: the counts already there keep
their numbers in an undated cell, one row per cell holds (the undated month included), and the
downgrade adds each cell's months back together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tests import support

INSERT = (
    "INSERT INTO outcome_tallies (model_id, predicted, referral, truth, count{month})"
    " VALUES ('m', :predicted, true, 'mel', :count{value})"
)


@pytest.fixture
def scratch(settings) -> Iterator[tuple[Any, Engine]]:  # type: ignore[no-untyped-def]
    with support.scratch_database(settings.database_url, "migrations") as made:
        yield made


def _cells(connection: Any) -> set[tuple[Any, ...]]:
    return {tuple(row) for row in connection.execute(text("SELECT * FROM outcome_tallies ORDER BY predicted"))}


def test_the_tally_gains_months_and_gives_them_back(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0019")
    with engine.begin() as connection:
        for predicted, count in (("mel", 5), ("nv", 2)):
            connection.execute(text(INSERT.format(month="", value="")), {"predicted": predicted, "count": count})

    command.upgrade(config, "0020")
    dated = INSERT.format(month=", month", value=", :month")
    with engine.begin() as connection:
        tallies = "SELECT predicted, month, count FROM outcome_tallies ORDER BY predicted"
        assert [tuple(row) for row in connection.execute(text(tallies))] == [("mel", None, 5), ("nv", None, 2)]
        connection.execute(text(dated), {"predicted": "mel", "count": 3, "month": "2026-11-01"})
        reported = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'confirmed_outcomes'"
        assert connection.scalar(text(f"{reported} AND column_name = 'tally_month'")) == 1
    # one row per cell: a second undated row of a cell is refused like a second dated one
    for month in (None, "2026-11-01"):
        with pytest.raises(IntegrityError, match="uq_outcome_tallies_cell"), engine.begin() as connection:
            connection.execute(text(dated), {"predicted": "mel", "count": 1, "month": month})

    command.downgrade(config, "0019")
    with engine.begin() as connection:
        assert _cells(connection) == {("m", "mel", True, "mel", 8), ("m", "nv", True, "mel", 2)}
        with pytest.raises(IntegrityError, match="pk_outcome_tallies"):
            connection.execute(text(INSERT.format(month="", value="")), {"predicted": "nv", "count": 1})
