"""Migration 0016 on a database of its own: cases purged before erasure overwrote the upload's
SHA-256 lose it too (it finds a case from any copy of the photo); live cases keep theirs."""

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
    with support.scratch_database(settings.database_url, "digests") as made:
        yield made


def test_cases_purged_before_lose_their_image_digest(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0015")
    clinic_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO clinics (id, name) VALUES (:id, 'digest clinic')"), {"id": clinic_id})
        purged, live = _case(connection, clinic_id, "purged"), _case(connection, clinic_id, "succeeded")
        connection.execute(text("UPDATE cases SET image_sha256 = repeat('ab', 32)"))
    command.upgrade(config, "head")
    with engine.connect() as connection:
        digests = dict(connection.execute(text("SELECT id, image_sha256 FROM cases")).all())
    assert digests == {purged: "0" * 64, live: "ab" * 32}
