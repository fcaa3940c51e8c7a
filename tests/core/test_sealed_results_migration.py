"""Migration 0009 (sealed results) on a database of its own: confirmed outcomes stored so far are
counted in the case-free tally, cases purged before it lose their findings and confirmed diagnosis,
plain rows stay readable for the sweeper, and the downgrade refuses to drop sealed findings or the tally."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.migration_rows import DIAGNOSIS, insert_case, insert_clinic, insert_confirmed_outcome, insert_result

FINDINGS = "label, probabilities, confidence, uncertainty, referral, referral_reasons, ood_reasons, gradcam_class"


def test_the_sealed_results_migration_counts_shreds_and_refuses_to_lose_findings(  # type: ignore[no-untyped-def]
    scratch: tuple[Any, Engine],
) -> None:
    config, engine = scratch
    command.upgrade(config, "0008")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection)
        live, erased = insert_case(connection, clinic_id), insert_case(connection, clinic_id, status="purged")
        for case_id in (live, erased):
            insert_result(connection, case_id, **DIAGNOSIS)
            insert_confirmed_outcome(connection, case_id, clinic_id, "mel")

    command.upgrade(config, "head")
    with engine.begin() as connection:
        tally = connection.execute(text("SELECT model_id, predicted, referral, truth, count FROM outcome_tallies"))
        assert [tuple(row) for row in tally] == [("m", "nv", False, "mel", 2)]
        findings = {
            row[0]: tuple(row[1:]) for row in connection.execute(text(f"SELECT case_id, {FINDINGS} FROM results"))
        }
        assert findings[erased] == (None,) * 8  # no diagnosis of an erased case survives the upgrade
        assert findings[live][0] == "nv"  # plain until the sweeper seals it (it needs the keys)
        assert connection.scalar(text("SELECT array_agg(case_id) FROM confirmed_outcomes")) == [live]
        sealed = insert_case(connection, clinic_id)
        insert_result(connection, sealed, **dict.fromkeys(FINDINGS.split(", ")))  # the findings sealed: NULL

    with pytest.raises(RuntimeError, match="1 results are sealed"):
        command.downgrade(config, "0008")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM results WHERE case_id = :id"), {"id": sealed})
    # the erased case's outcome is in the tally only: dropping it would lose that for good
    with pytest.raises(RuntimeError, match="1 outcome tallies are stored"):
        command.downgrade(config, "0008")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM outcome_tallies"))
    command.downgrade(config, "0008")
    with engine.begin() as connection:
        assert connection.scalar(text("SELECT array_agg(case_id) FROM results")) == [live]
