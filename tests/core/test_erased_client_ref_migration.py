"""Migrations 0018 and 0007 on a database of their own: cases purged before a purge emptied the plain client
reference lose it, and their leftover blobs go; live cases keep both. 0007's downgrade refuses to delete
sealed references."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.migration_rows import insert_blob, insert_case, insert_clinic


def test_cases_purged_before_lose_their_plain_reference_and_leftover_blobs(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0017")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection, "ref clinic")
        purged, live = insert_case(connection, clinic_id, "purged"), insert_case(connection, clinic_id, "succeeded")
        connection.execute(text("UPDATE cases SET client_ref = 'MRN-' || left(id::text, 8)"))
        insert_blob(connection, purged, "client_ref")
        insert_blob(connection, live, "image")
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
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection, "ref clinic")
        live = insert_case(connection, clinic_id, "succeeded")
        insert_blob(connection, live, "client_ref")
    with pytest.raises(RuntimeError, match="1 client references are sealed"):
        command.downgrade(config, "0006")
    with engine.begin() as connection:  # once the case is erased there is nothing to lose
        connection.execute(text("UPDATE cases SET status = 'purged'"))
    command.downgrade(config, "0006")
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM case_blobs")) == 0
