"""Migration 0004 (result outcome) on a database of its own: existing results become diagnoses, the
table then refuses a label on an out-of-distribution result, and the downgrade turns such a result
into what the old schema can say truthfully (a failed case without a label) instead of failing."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tests.core.migration_rows import DIAGNOSIS, insert_case, insert_clinic, insert_result


def _column_exists(connection: Any, column: str) -> bool:
    query = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'results' AND column_name = :column"
    return bool(connection.scalar(text(query), {"column": column}))


def _nullable(connection: Any, column: str) -> bool:
    return bool(
        connection.scalar(
            text(
                "SELECT is_nullable = 'YES' FROM information_schema.columns"
                " WHERE table_name = 'results' AND column_name = :column"
            ),
            {"column": column},
        )
    )


def test_the_outcome_migration_upgrades_refuses_and_downgrades(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0003")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection)
        before = insert_case(connection, clinic_id)
        insert_result(connection, before, **DIAGNOSIS)

    command.upgrade(config, "head")
    with engine.begin() as connection:
        row = connection.execute(text("SELECT outcome, ood_reasons, label FROM results")).one()
        assert tuple(row) == ("diagnosis", [], "nv")
        assert _nullable(connection, "label") and _nullable(connection, "probabilities")
        out_of_distribution = insert_case(connection, clinic_id)
        insert_result(
            connection,
            out_of_distribution,
            outcome="out_of_distribution",
            ood_reasons='["blank"]',
            gradcam_status="not_applicable",
        )
    with pytest.raises(IntegrityError, match="ck_results_outcome_fields"), engine.begin() as connection:
        insert_result(
            connection,
            insert_case(connection, clinic_id),
            outcome="out_of_distribution",
            ood_reasons='["blank"]',
            **DIAGNOSIS,
        )

    command.downgrade(config, "0003")
    with engine.begin() as connection:
        cases = {row.id: (row.status, row.failure_code) for row in connection.execute(text("SELECT * FROM cases"))}
        assert cases[before] == ("succeeded", None)
        assert cases[out_of_distribution] == ("failed", "out_of_distribution")
        failed = text("SELECT failure_message FROM cases WHERE id = :id")
        message = connection.scalar(failed, {"id": out_of_distribution})
        assert "no diagnosis was made" in message
        assert connection.scalar(text("SELECT count(*) FROM results")) == 1
        assert not _nullable(connection, "label") and not _nullable(connection, "probabilities")
        assert not _column_exists(connection, "outcome") and not _column_exists(connection, "ood_reasons")

    command.upgrade(config, "head")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT outcome FROM results WHERE case_id = :id"), {"id": before}) == "diagnosis"
