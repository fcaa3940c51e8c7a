"""Database errors quote the values of the failing statement; none of that reaches Celery's events."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.config import Settings
from core.db import make_engine
from worker.retries import withheld


def test_what_celery_is_told_of_a_database_error_quotes_no_value(settings: Settings, database) -> None:  # type: ignore[no-untyped-def]
    """Celery puts the error it is given into its task-retried and task-failed events (and so into
    Flower). Postgres's own message quotes the failing value; SQLAlchemy's would list the parameters."""
    marker = "MRN-4417-secret-client-ref"
    engine = make_engine(settings)
    try:
        with engine.connect() as connection, pytest.raises(DBAPIError) as failed:
            connection.execute(text("SELECT CAST(:value AS integer)"), {"value": marker})
    finally:
        engine.dispose()
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(failed.value)
    assert marker in str(failed.value)  # Postgres quotes it: hence what follows
    told = withheld(failed.value)
    assert marker not in str(told) and marker not in repr(told)
    assert "DataError" in str(told)
