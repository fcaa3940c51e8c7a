"""Migration 0020 (the monthly field tally) on a database of its own: the lifetime tally is left as it
was, so the release before it goes on counting reports while a deploy rolls out, and the downgrade
refuses to drop a month's counts (they cannot be rebuilt) and otherwise drops only what the migration added."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

#: the statement the release before 0020 counts a report with (core/outcomes.py at 0019)
PREVIOUS_RELEASE_TALLY = (
    "INSERT INTO outcome_tallies (model_id, predicted, referral, truth, count) VALUES ('m', 'nv', false, 'mel', 1)"
    " ON CONFLICT (model_id, predicted, referral, truth) DO UPDATE SET count = outcome_tallies.count + 1"
)


def _tables(connection: Any) -> set[str]:
    return set(connection.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))


def test_the_previous_release_still_counts_reports_and_the_downgrade_keeps_them(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0019")
    with engine.begin() as connection:
        connection.execute(text(PREVIOUS_RELEASE_TALLY))

    command.upgrade(config, "0020")
    with engine.begin() as connection:
        connection.execute(text(PREVIOUS_RELEASE_TALLY))  # an API pod not yet rolled out takes a report
        assert connection.scalar(text("SELECT count FROM outcome_tallies")) == 2
        assert "outcome_monthly_tallies" in _tables(connection)
        connection.execute(
            text(
                "INSERT INTO outcome_monthly_tallies (model_id, month, predicted, referral, truth, count)"
                " VALUES ('m', '2026-11-01', 'nv', false, 'mel', 1)"
            )
        )

    with pytest.raises(RuntimeError, match="1 monthly outcome tallies are stored"):
        command.downgrade(config, "0019")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT count(*) FROM outcome_monthly_tallies")) == 1  # nothing dropped
        connection.execute(text("DELETE FROM outcome_monthly_tallies"))  # the operator's choice, as the refusal says
    command.downgrade(config, "0019")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT count FROM outcome_tallies")) == 2
        assert "outcome_monthly_tallies" not in _tables(connection)
        columns = "SELECT column_name FROM information_schema.columns WHERE table_name = 'confirmed_outcomes'"
        assert "tally_month" not in set(connection.scalars(text(columns)))
