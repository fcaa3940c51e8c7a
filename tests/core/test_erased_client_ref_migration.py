"""Migrations 0018 and 0007 on a database of their own: cases purged before a purge emptied the plain client
reference lose it, and their leftover blobs go; live cases keep both. 0007's downgrade refuses to delete
sealed references."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests import support
from tests.core.test_result_outcome_migration import _case


@pytest.fixture
def scratch(settings) -> Iterator[tuple[Any, Engine]]:  # type: ignore[no-untyped-def]
    with support.scratch_database(settings.database_url, "client_refs") as made:
        yield made


def _blob(connection: Any, case_id: uuid.UUID, kind: str) -> None:
    connection.execute(
        text(
            "INSERT INTO case_blobs (id, case_id, kind, ciphertext, nonce, wrapped_key, kek_id, media_type) "
            "VALUES (:id, :case, :kind, 'x', 'n', 'k', 'period-2026-10', 'application/octet-stream')"
        ),
        {"id": uuid.uuid4(), "case": case_id, "kind": kind},
    )


def test_cases_purged_before_lose_their_plain_reference_and_leftover_blobs(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0017")
    clinic_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO clinics (id, name) VALUES (:id, 'ref clinic')"), {"id": clinic_id})
        purged, live = _case(connection, clinic_id, "purged"), _case(connection, clinic_id, "succeeded")
        connection.execute(text("UPDATE cases SET client_ref = 'MRN-' || left(id::text, 8)"))
        _blob(connection, purged, "client_ref")
        _blob(connection, live, "image")
    command.upgrade(config, "head")
    with engine.connect() as connection:
        refs = dict(connection.execute(text("SELECT id, client_ref FROM cases")).all())
        blobs = connection.execute(text("SELECT case_id, kind FROM case_blobs")).all()
    assert refs == {purged: None, live: f"MRN-{str(live)[:8]}"}
    assert [(row.case_id, row.kind) for row in blobs] == [(live, "image")]


def test_downgrading_past_sealed_references_is_refused_rather_than_losing_them(scratch: tuple[Any, Engine]) -> None:
    """Below 0007 a reference lives in plain text only: the downgrade deleted every sealed one (each
    case's link to its patient record), as 0009's and 0010's refuse to for findings and diagnoses."""
    config, engine = scratch
    command.upgrade(config, "0007")
    clinic_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO clinics (id, name) VALUES (:id, 'ref clinic')"), {"id": clinic_id})
        live = _case(connection, clinic_id, "succeeded")
        _blob(connection, live, "client_ref")
    with pytest.raises(RuntimeError, match="1 client references are sealed"):
        command.downgrade(config, "0006")
    with engine.begin() as connection:  # once the case is erased there is nothing to lose
        connection.execute(text("UPDATE cases SET status = 'purged'"))
    command.downgrade(config, "0006")
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM case_blobs")) == 0
