"""Migration 0018 on a database of its own: cases purged before a purge emptied the plain client
reference lose it, and their leftover blobs go; live cases keep both."""

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
