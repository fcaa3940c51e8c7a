"""Retention keeps up with a backlog: one run of the purge task crypto-shreds every expired case, a
batch per transaction, where it used to shred one batch a run (500 cases an hour by default: fewer
than one host classifies, so expired cases, and the backups that can still read them, piled up)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from core import retention
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.models import Case
from tests.conftest import Tenant, own_database_fixtures, own_period_keys_fixtures
from worker import tasks

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py

# retention looks at every case of its database and every key of its period-key folder: this module
# has a database and a folder of its own (its tenant, store_case and keyring are theirs)
tenant, store_case = own_database_fixtures()
own, keyring = own_period_keys_fixtures()


def test_one_purge_run_shreds_a_backlog_larger_than_a_batch(
    own: Settings,
    settings: Settings,
    keyring: Keyring,
    tenant: Tenant,
    store_case,
    jpeg_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    assert keyring.periods is not None and settings.period_key_folder is not None
    shared = sorted((p.name, p.stat().st_mtime_ns) for p in settings.period_key_folder.iterdir())
    monkeypatch.setattr(retention, "BATCH", 2)
    monkeypatch.setattr(tasks, "settings", lambda: own)
    keyring.periods.ensure("2019-02")  # a period long past retention, with no case: the run destroys its key
    expired = [store_case(tenant, jpeg_bytes) for _ in range(5)]
    recent = store_case(tenant, jpeg_bytes)
    long_ago = datetime.now(UTC) - timedelta(days=own.retention_days + 1)
    with session_scope(own) as session:
        ended = {"status": "failed", "failure_code": "invalid_image", "failure_message": "no"}
        session.execute(update(Case).where(Case.id.in_([*expired, recent])).values(**ended))
        session.execute(update(Case).where(Case.id.in_(expired)).values(created_at=long_ago))
    assert tasks.purge()["purged"] == 5  # three batches in one run
    with session_scope(own) as session:
        status = dict(session.execute(select(Case.id, Case.status).where(Case.id.in_([*expired, recent]))).all())
    assert [status[case_id] for case_id in expired] == ["purged"] * 5 and status[recent] == "failed"
    # it ran on the module's period-key folder; the shared one is as it was
    assert keyring.periods.destroyed("2019-02")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in settings.period_key_folder.iterdir()) == shared
