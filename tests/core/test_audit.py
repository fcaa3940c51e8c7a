"""core.audit against the real Postgres: an append-only, hash-chained trail that cannot fork and
whose tampering `verify` pinpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from core import audit
from core.db import session_scope
from tests.support import ROOT


def _record(settings, n: int = 1, **detail: object) -> list[int]:  # type: ignore[no-untyped-def]
    ids = []
    with session_scope(settings) as session:
        for i in range(n):
            event = audit.record(
                session,
                action="test.event",
                outcome=audit.SUCCESS,
                actor=audit.SYSTEM,
                entity_type="test",
                entity_id=str(uuid.uuid4()),
                detail={"i": i, **detail},
            )
            ids.append(event.id)
    return ids


def _verify(settings) -> audit.ChainReport:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return audit.verify_chain(session)


def test_chain_links_each_row_to_the_previous(settings, database) -> None:  # type: ignore[no-untyped-def]
    ids = _record(settings, 3, note="ünïcode ok")
    with session_scope(settings) as session:
        rows = session.execute(
            text("SELECT id, prev_hash, hash FROM audit_events WHERE id = ANY(:ids) ORDER BY id"), {"ids": ids}
        ).all()
    assert rows[1].prev_hash == rows[0].hash and rows[2].prev_hash == rows[1].hash
    assert _verify(settings).ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET action = 'edited' WHERE id = (SELECT max(id) FROM audit_events)",
        "DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)",
        "TRUNCATE audit_events",
    ],
)
def test_the_database_refuses_changes(settings, database, statement: str) -> None:  # type: ignore[no-untyped-def]
    _record(settings)
    with pytest.raises(DBAPIError, match="append-only"), session_scope(settings) as session:
        session.execute(text(statement))


def test_concurrent_writers_do_not_fork_the_chain(settings, database) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []

    def write() -> None:
        try:
            _record(settings, 10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with session_scope(settings) as session:
        forks = session.scalar(
            text("SELECT count(*) FROM (SELECT prev_hash FROM audit_events GROUP BY prev_hash HAVING count(*) > 1) f")
        )
    assert forks == 0
    assert _verify(settings).ok


def test_superuser_edit_is_found_and_named(settings, database) -> None:  # type: ignore[no-untyped-def]
    ids = _record(settings, 3)
    target = ids[1]
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": target})
            connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"))
        report = _verify(settings)
        assert not report.ok and report.first_bad_id == target and "altered" in (report.reason or "")
        cli = subprocess.run(
            [sys.executable, "-m", "cli", "audit", "verify"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=_env(settings),
        )
        assert cli.returncode == 1 and f"event {target}" in cli.stdout
    finally:
        with engine.begin() as connection:  # restore the row so later tests see an intact chain
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 1}' WHERE id = :id"), {"id": target})
            connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"))
        engine.dispose()
    assert _verify(settings).ok


def test_removed_row_breaks_the_link(settings, database) -> None:  # type: ignore[no-untyped-def]
    ids = _record(settings, 3)
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            saved = (
                connection.execute(text("SELECT * FROM audit_events WHERE id = :id"), {"id": ids[1]}).mappings().one()
            )
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[1]})
        report = _verify(settings)
        assert not report.ok and report.first_bad_id == ids[2] and "removed" in (report.reason or "")
    finally:
        with engine.begin() as connection:
            columns = ", ".join(saved)
            values = ", ".join(f":{k}" for k in saved)
            params = {k: (v if k != "detail" else json.dumps(v)) for k, v in saved.items()}
            connection.execute(text(f"INSERT INTO audit_events ({columns}) VALUES ({values})"), params)
            connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"))
        engine.dispose()
    assert _verify(settings).ok


def _env(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    import os

    return {**os.environ, "DERMQ_DATABASE_URL": settings.database_url, "DERMQ_KEY_FILE": str(settings.key_file)}
