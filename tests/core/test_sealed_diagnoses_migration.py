"""Migration 0010 (sealed confirmed diagnoses) on a database of its own: a plain diagnosis stays
readable for the sweeper, a sealed one (NULL in the column, an ``outcome`` blob) is accepted, and the
downgrade refuses while a diagnosis is sealed."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.test_result_outcome_migration import DIAGNOSIS, _case, _result, scratch  # noqa: F401


def test_the_sealed_diagnoses_migration_keeps_plain_rows_and_refuses_to_lose_sealed_ones(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine],  # noqa: F811
) -> None:
    config, engine = scratch
    command.upgrade(config, "0009")
    clinic_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO clinics (id, name) VALUES (:id, 'migration clinic')"), {"id": clinic_id})
        plain = _case(connection, clinic_id)
        _result(connection, plain, **DIAGNOSIS)
        connection.execute(
            text(
                "INSERT INTO confirmed_outcomes (case_id, clinic_id, diagnosis, method) VALUES (:c, :k, 'mel', 'histo')"
            ),
            {"c": plain, "k": clinic_id},
        )

    command.upgrade(config, "0010")
    with engine.begin() as connection:
        assert (
            connection.scalar(text("SELECT diagnosis FROM confirmed_outcomes WHERE case_id = :c"), {"c": plain})
            == "mel"
        )
        sealed = _case(connection, clinic_id)
        _result(connection, sealed, **DIAGNOSIS)
        connection.execute(
            text(
                "INSERT INTO confirmed_outcomes (case_id, clinic_id, diagnosis, method) VALUES (:c, :k, NULL, 'histo')"
            ),
            {"c": sealed, "k": clinic_id},
        )
        connection.execute(
            text(
                "INSERT INTO case_blobs (id, case_id, kind, ciphertext, nonce, wrapped_key, kek_id, media_type)"
                " VALUES (:id, :c, 'outcome', '\\x00', '\\x00', '\\x00', 'k', 'text/plain')"
            ),
            {"id": uuid.uuid4(), "c": sealed},
        )

    with pytest.raises(RuntimeError, match="1 confirmed diagnoses are sealed"):
        command.downgrade(config, "0009")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM confirmed_outcomes WHERE case_id = :c"), {"c": sealed})
    command.downgrade(config, "0009")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT count(*) FROM case_blobs WHERE kind = 'outcome'")) == 0
        assert connection.scalar(text("SELECT diagnosis FROM confirmed_outcomes")) == "mel"
