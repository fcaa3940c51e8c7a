"""Migrations 0016 and 0025 on a database of its own: cases purged before erasure overwrote the
upload's SHA-256 lose it too (it finds a case from any copy of the photo), and those purged before
erasure emptied their exact sizes and input statistics lose them (with the digest gone they still
found a case nearly as well); live cases keep theirs."""

from __future__ import annotations

import json
from typing import Any

from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.core.migration_rows import DIAGNOSIS, insert_case, insert_clinic, insert_result


def test_cases_purged_before_lose_their_image_digest(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0015")
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection, "digest clinic")
        purged, live = insert_case(connection, clinic_id, "purged"), insert_case(connection, clinic_id, "succeeded")
        connection.execute(text("UPDATE cases SET image_sha256 = repeat('ab', 32)"))
    command.upgrade(config, "head")
    with engine.connect() as connection:
        digests = dict(connection.execute(text("SELECT id, image_sha256 FROM cases")).all())
    assert digests == {purged: "0" * 64, live: "ab" * 32}


def test_cases_purged_before_lose_their_sizes_and_input_statistics(scratch: tuple[Any, Engine]) -> None:
    config, engine = scratch
    command.upgrade(config, "0024")
    stats = {"brightness": 112.345, "contrast": 40.123, "megapixels": 0.0675}
    with engine.begin() as connection:
        clinic_id = insert_clinic(connection, "sizes clinic")
        purged, live = insert_case(connection, clinic_id, "purged"), insert_case(connection, clinic_id, "succeeded")
        for case_id in (purged, live):
            insert_result(connection, case_id, **DIAGNOSIS)
        connection.execute(text("UPDATE results SET input_stats = CAST(:s AS jsonb)"), {"s": json.dumps(stats)})
    command.upgrade(config, "head")
    with engine.connect() as connection:
        sizes = {
            row[0]: tuple(row[1:])
            for row in connection.execute(text("SELECT id, image_width, image_height, image_bytes FROM cases"))
        }
        kept = dict(connection.execute(text("SELECT case_id, input_stats FROM results")).all())
    assert sizes == {purged: (0, 0, 0), live: (300, 225, 1000)}
    assert kept == {purged: {}, live: stats}
