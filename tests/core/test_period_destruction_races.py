"""Period-key destruction beside another run of retention (a second beat during a rolling deploy, an
operator's `dermq keys destroy-period --force` or `dermq case purge-expired` while beat's purge runs):
each case is purged once and each period destroyed once, in the audit trail and in what each run says
it did."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text, update

from core import period_shredding, retention
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob
from core.periods import kek_id
from tests import support
from tests.conftest import Tenant, own_database_fixtures, own_period_keys_fixtures

pytestmark = pytest.mark.usefixtures("database")

# retention looks at every case of its database and every key of its period-key folder: this module
# has a database and a folder of its own
tenant, store_case = own_database_fixtures()
own, keyring = own_period_keys_fixtures()

PERIOD = "2019-02"


def _waiting(settings: Settings, count: int) -> bool:
    """Whether ``count`` sessions of the database wait for a lock (read in a transaction of its own:
    Postgres keeps one view of its activity for a whole transaction)."""
    with session_scope(settings) as session:
        waiting = session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )
    return int(waiting or 0) >= count


def _events(settings: Settings, action: str, entity_id: str) -> list[dict[str, Any]]:
    with session_scope(settings) as session:
        query = select(AuditEvent.detail).where(AuditEvent.action == action, AuditEvent.entity_id == entity_id)
        return list(session.scalars(query))


def _case_of_the_period(settings: Settings, tenant: Tenant, store_case, jpeg_bytes: bytes) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A finished case created in :data:`PERIOD`, long past retention, its blobs under the period's key."""
    case_id = store_case(tenant, jpeg_bytes)
    ended = {"status": "failed", "failure_code": "invalid_image", "failure_message": "no"}
    with session_scope(settings) as session:
        created = datetime(2019, 2, 10, tzinfo=UTC)
        session.execute(update(Case).where(Case.id == case_id).values(**ended, created_at=created))
        session.execute(update(CaseBlob).where(CaseBlob.case_id == case_id).values(kek_id=kek_id(PERIOD)))
    return case_id


def test_a_forced_destruction_does_not_purge_again_a_case_retention_purged_meanwhile(
    own: Settings, keyring: Keyring, tenant: Tenant, store_case, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    """The operator's forced destruction reads the period's live cases while beat's purge is shredding
    one of them: it used to purge it again once the purge committed, two ``case.purge`` events for one
    case (the second with nothing left to shred) and a destruction that said it had purged it."""
    assert keyring.periods is not None
    keyring.periods.ensure(PERIOD)
    case_id = _case_of_the_period(own, tenant, store_case, jpeg_bytes)
    outcome: dict[str, Any] = {}

    def destroy() -> None:
        try:
            outcome["done"] = period_shredding.destroy_period(own, PERIOD, force=True)
        except Exception as exc:  # the assertion below names it
            outcome["error"] = repr(exc)

    with session_scope(own) as session:  # beat's purge, its batch shredded and not yet committed
        assert retention.purge_expired(session, own).purged == [str(case_id)]
        session.flush()
        destroyer = threading.Thread(target=destroy)
        destroyer.start()
        support.wait_for(lambda: _waiting(own, 1), timeout=30, interval=0.05, what="the destruction to wait")
    destroyer.join(timeout=60)

    assert "done" in outcome, outcome
    purges = _events(own, "case.purge", str(case_id))
    assert [event["reason"] for event in purges] == ["retention"]  # one purge, one event
    assert outcome["done"]["purged"] == 0  # and the destruction says it purged nothing
    assert keyring.periods.destroyed(PERIOD)


def test_two_retention_runs_each_say_only_what_they_destroyed(own: Settings, keyring: Keyring) -> None:
    """Two runs of retention at once (two beats, or the command beside beat's purge) both find a period
    due and wait for its lock: the one that gets it second found it destroyed, and used to report it
    destroyed too (in its task's result, and `dermq case purge-expired` printed it)."""
    assert keyring.periods is not None
    period = "2019-03"
    keyring.periods.ensure(period)
    runs: list[list[str]] = []

    def run() -> None:
        runs.append(period_shredding.destroy_expired(own, failed=lambda *_: None))

    with session_scope(own) as session:  # a transaction sealing under the period holds both runs back
        held = "SELECT pg_advisory_xact_lock_shared(:c, :k)"
        session.execute(text(held), {"c": period_shredding.LOCK_CLASS, "k": period_shredding._lock_key(period)})
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        support.wait_for(lambda: _waiting(own, 2), timeout=30, interval=0.05, what="both runs to wait")
    for thread in threads:
        thread.join(timeout=60)

    assert len(runs) == 2
    assert sorted(period in destroyed for destroyed in runs) == [False, True], runs
    assert len(_events(own, "keys.destroy_period", kek_id(period))) == 1
    assert keyring.periods.destroyed(period)
