"""Migration 0008 (confirmed outcomes) on a database of its own: the downgrade refuses to drop the
diagnoses clinics reported, which no other table holds, and drops the empty table."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.migration_rows import DIAGNOSIS, insert_case, insert_clinic, insert_confirmed_outcome, insert_result


def _tables(connection: Any) -> set[str]:
    return set(connection.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))


def test_downgrading_past_reported_outcomes_is_refused_rather_than_losing_them(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine],
) -> None:
    config, engine = scratch
    command.upgrade(config, "0008")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection, "outcome clinic")
        case_id = insert_case(connection, clinic_id)
        insert_result(connection, case_id, **DIAGNOSIS)
        insert_confirmed_outcome(connection, case_id, clinic_id, "mel")

    with pytest.raises(RuntimeError, match="1 confirmed outcomes are stored"):
        command.downgrade(config, "0007")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT diagnosis FROM confirmed_outcomes")) == "mel"  # nothing dropped
        connection.execute(text("DELETE FROM confirmed_outcomes"))
    command.downgrade(config, "0007")
    with engine.connect() as connection:
        assert "confirmed_outcomes" not in _tables(connection)
