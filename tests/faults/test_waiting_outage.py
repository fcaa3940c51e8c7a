"""A waiting submission (``POST /v1/cases?wait=S``) whose database goes away while it waits, with real
processes: the case was committed, and its task sent, before the wait began, so the answer must name
the case (its ``Location`` and id) rather than say that nothing was stored."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from core.db import dispose_engines, session_scope
from core.models import AuditEvent, Case
from tests import support
from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.slow


def clinic_cases(stack: FaultStack) -> set[uuid.UUID]:
    with session_scope(stack.settings) as session:
        return set(session.scalars(select(Case.id).where(Case.clinic_id == stack.clinic_id)))


def test_a_waiting_submission_whose_database_stops_names_its_stored_case(stack: FaultStack) -> None:
    """No worker runs, so the case stays queued and its submission waits. Postgres stops (a restart, a
    failover): the listener loses its connection, the wait looks at its case and finds no database.
    The answer said ``database_unavailable``: "nothing was stored", without the case's id, and a portal
    without an Idempotency-Key sent the image again as a second case, while the first was classified
    once Postgres was back."""
    before = clinic_cases(stack)
    answers: list[httpx.Response] = []
    image = {"image": ("lesion.jpg", stack.images[2], "image/jpeg")}
    post = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{stack.base_url}/v1/cases?wait=30", headers=stack.headers, files=image, timeout=60)
        )
    )
    post.start()
    new = support.wait_for(lambda: clinic_cases(stack) - before, timeout=30, what="the case to be committed")
    (case_id,) = new
    stack.pg.stop()
    try:
        post.join(30)  # answered while the database is down
        assert not post.is_alive()
    finally:
        stack.pg.start()
        dispose_engines()  # this process's pooled connections died with the server
    (answer,) = answers
    assert answer.status_code == 503, answer.text
    problem = answer.json()
    # the case it stored, to poll (a fast stop loses nothing committed: the case is there)
    assert problem.get("case_id") == str(case_id), problem
    assert answer.headers.get("location") == f"/v1/cases/{case_id}"
    assert "nothing was stored" not in problem["detail"]
    assert int(answer.headers["retry-after"]) > 0
    assert stack.case(case_id).status == "queued"

    # and it ends once, as any accepted case does
    stack.start_worker("after-waiting-outage")
    case = stack.wait_terminal(case_id, timeout=120)
    assert (case.status, case.attempts) == ("succeeded", 1), (case.status, case.failure_code)
    assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert clinic_cases(stack) - before == {case_id}  # one case for the one submission
    with session_scope(stack.settings) as session:
        created = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.create")
        )
    assert created == 1
