"""Confirmed outcomes reported at the same moment, over the API in its own process (real sockets, its
own threads and connections): corrections of different cases that move counts between the same tally
cells in opposite directions."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select, text

from core.db import session_scope
from core.models import Case, CaseStatus
from core.outcome_models import OutcomeMonthlyTally, OutcomeTally
from tests import support
from tests.api.test_outcomes import result_row
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def lock_waiters(settings) -> int:  # type: ignore[no-untyped-def]
    """Backends of this database waiting on a row or transaction lock now (a transaction of its own:
    pg_stat_activity is read once per transaction)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    with session_scope(settings) as session:
        return int(session.execute(text(query)).scalar_one())


def test_opposite_corrections_at_once_both_succeed_and_move_their_counts(  # type: ignore[no-untyped-def]
    live_api: str, tenant: Tenant, store_case, settings
) -> None:
    """Two cases the model answered alike (nv, not referred): one corrected from mel to nv while the
    other is corrected from nv to mel. Each correction takes its count from one cell and adds it to
    the other; taken in the order of the report, the two took the same two row locks in opposite
    orders, and Postgres broke the deadlock by failing one of them: a 503 saying the database was
    unreachable, after a second's stall. Here a third transaction holds the first cell's lifetime row
    until both corrections wait, so that they meet every time."""
    model = f"field-race-{uuid.uuid4().hex[:8]}"
    first, second = (store_case(tenant, uuid.uuid4().bytes) for _ in range(2))
    with session_scope(settings) as session:
        for case_id in (first, second):
            session.add(result_row(case_id, model, "nv", False))
            session.get(Case, case_id).status = CaseStatus.SUCCEEDED.value

    def report(http: httpx.Client, case_id: uuid.UUID, diagnosis: str) -> httpx.Response:
        body = {"diagnosis": diagnosis, "method": "histo"}
        return http.post(f"/v1/cases/{case_id}/outcome", headers=tenant.headers, json=body)

    with httpx.Client(base_url=live_api, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        assert report(http, first, "mel").status_code == 201
        assert report(http, second, "nv").status_code == 201
        with session_scope(settings) as blocker:
            blocker.execute(
                select(OutcomeTally)
                .where(OutcomeTally.model_id == model, OutcomeTally.truth == "mel")
                .with_for_update()
            ).one()
            # mel -> nv: waits for the mel cell, the first it changes
            moved_to_nv = pool.submit(report, http, first, "nv")
            support.wait_for(lambda: lock_waiters(settings) >= 1, timeout=20, what="the first correction to wait")
            # nv -> mel: takes the nv cells, then waits for the mel cell
            moved_to_mel = pool.submit(report, http, second, "mel")
            support.wait_for(lambda: lock_waiters(settings) >= 2, timeout=20, what="the second correction to wait")
            blocker.rollback()
        answers = [moved_to_nv.result(), moved_to_mel.result()]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    with session_scope(settings) as session:
        lifetime = session.scalars(select(OutcomeTally).where(OutcomeTally.model_id == model))
        monthly = session.scalars(select(OutcomeMonthlyTally).where(OutcomeMonthlyTally.model_id == model))
        assert sorted((r.truth, r.count) for r in lifetime) == [("mel", 1), ("nv", 1)]
        assert sorted((r.truth, r.count) for r in monthly) == [("mel", 1), ("nv", 1)]
