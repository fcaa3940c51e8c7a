"""Migration 0010 (sealed confirmed diagnoses) on a database of its own: a plain diagnosis stays
readable for the sweeper, a sealed one (NULL in the column, an ``outcome`` blob) is accepted, and the
downgrade refuses while a diagnosis is sealed."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.migration_rows import (
    DIAGNOSIS,
    insert_blob,
    insert_case,
    insert_clinic,
    insert_confirmed_outcome,
    insert_result,
)


def test_the_sealed_diagnoses_migration_keeps_plain_rows_and_refuses_to_lose_sealed_ones(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine],
) -> None:
    config, engine = scratch
    command.upgrade(config, "0009")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection)
        plain = insert_case(connection, clinic_id)
        insert_result(connection, plain, **DIAGNOSIS)
        insert_confirmed_outcome(connection, plain, clinic_id, "mel")

    command.upgrade(config, "0010")
    with engine.begin() as connection:
        assert (
            connection.scalar(text("SELECT diagnosis FROM confirmed_outcomes WHERE case_id = :c"), {"c": plain})
            == "mel"
        )
        sealed = insert_case(connection, clinic_id)
        insert_result(connection, sealed, **DIAGNOSIS)
        insert_confirmed_outcome(connection, sealed, clinic_id, None)  # sealed: the diagnosis in a blob
        insert_blob(connection, sealed, "outcome")

    with pytest.raises(RuntimeError, match="1 confirmed diagnoses are sealed"):
        command.downgrade(config, "0009")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM confirmed_outcomes WHERE case_id = :c"), {"c": sealed})
    command.downgrade(config, "0009")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT count(*) FROM case_blobs WHERE kind = 'outcome'")) == 0
        assert connection.scalar(text("SELECT diagnosis FROM confirmed_outcomes")) == "mel"
