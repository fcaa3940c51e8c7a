"""A batch that put its lead case back in the queue (its key could not be loaded: the attempt given
back) and then stopped: the lead may meanwhile be another worker's, under the same attempt number.
The task's error handlers failed it, fenced by that number, and so failed the other worker's live
claim. On a database of this module's own (a batch claims the oldest queued cases of its database)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from core import case_claims
from core.crypto import load_keyring
from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob
from tests.conftest import own_database_fixtures
from worker import batching, tasks

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py

tenant, store_case = own_database_fixtures()


def test_a_lead_its_batch_put_back_is_left_to_the_worker_that_took_it(  # type: ignore[no-untyped-def]
    own_database, tenant, store_case, jpeg_bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = own_database.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})
    monkeypatch.setattr(tasks, "settings", lambda: config)
    lead, other = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    folder = load_keyring(config).periods
    assert folder is not None
    exposed = folder.ensure("2025-02")
    key_file = folder._key_file("2025-02")
    key_file.chmod(0o644)  # readable by others: loading it raises KeyringError, not the case's doing
    with session_scope(config) as session:
        session.execute(update(CaseBlob).where(CaseBlob.case_id == lead).values(kek_id=exposed))

    def taken_then_stopped(*args: object, **kwargs: object) -> None:
        with session_scope(config) as session:  # another worker claims the lead put back, as attempt 1
            assert case_claims.claim_case(session, lead) is not None
        raise RuntimeError("the batch's pass failed")

    monkeypatch.setattr(batching, "_run_claimed_batch", taken_then_stopped)
    try:
        assert tasks.classify.apply(args=[str(lead)]).get() == "requeued"
    finally:
        key_file.unlink()
    with session_scope(config) as session:
        cases = {c.id: c for c in session.scalars(select(Case).where(Case.id.in_([lead, other])))}
        failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "case.fail")).all()
    assert (cases[lead].status, cases[lead].attempts) == ("running", 1)  # the other worker's claim, untouched
    assert failed == []
    assert cases[other].status == "queued"  # the batch put its other case back
