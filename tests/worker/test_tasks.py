"""The classify task: idempotent under redelivery, permanent failures, and the Grad-CAM budget."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Case, CaseBlob, Result
from tests import support

pytestmark = pytest.mark.usefixtures("database")


def case_row(settings, case_id: uuid.UUID) -> Case:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.get(Case, case_id)


def wait_terminal(settings, case_id: uuid.UUID, timeout: float = 120) -> Case:  # type: ignore[no-untyped-def]
    return support.wait_for(
        lambda: (c := case_row(settings, case_id)).status in ("succeeded", "failed") and c,
        timeout=timeout,
        interval=0.2,
        what="the case to finish",
    )


def test_an_image_that_does_not_decode_fails_without_retry(
    worker, tenant, store_case, publisher, settings, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    broken = store_case(tenant, jpeg_bytes[: len(jpeg_bytes) // 3])
    support.publish_classify(publisher, broken, "routine")
    case = wait_terminal(settings, broken)
    assert (case.status, case.failure_code, case.attempts) == ("failed", "invalid_image", 1)
    assert "truncated" in case.failure_message or "ends before" in case.failure_message
    # The worker survived and serves the next case.
    good = store_case(tenant, jpeg_bytes)
    support.publish_classify(publisher, good, "routine")
    assert wait_terminal(settings, good).status == "succeeded"
    assert worker.alive()


def test_redelivery_does_nothing_twice(worker, tenant, store_case, publisher, settings, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    def skipped() -> float:
        return worker.metric("dermq_jobs_total", outcome="skipped")

    case_id = store_case(tenant, jpeg_bytes)
    support.wait_for(lambda: worker.metrics(), timeout=30, what="the worker's metrics listener")
    before = skipped()
    for _ in range(3):  # a duplicated publish, as after a lost acknowledgement
        support.publish_classify(publisher, case_id, "routine")
    first = wait_terminal(settings, case_id)
    support.wait_for(lambda: skipped() == before + 2, timeout=30, what="the worker to skip the duplicates")
    support.publish_classify(publisher, case_id, "routine")
    support.wait_for(lambda: skipped() == before + 3, timeout=30, what="the worker to skip the redelivery")
    with session_scope(settings) as session:
        results = session.scalar(select(func.count()).select_from(Result).where(Result.case_id == case_id))
        heatmaps = session.scalar(
            select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == "heatmap")
        )
    after = case_row(settings, case_id)
    assert results == 1 and heatmaps == 1
    assert (after.status, after.attempts, after.finished_at) == ("succeeded", 1, first.finished_at)


def test_gradcam_past_its_budget_leaves_a_result_without_heat_map(
    tenant, store_case, settings, jpeg_bytes: bytes, client
) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_classification

    case_id = store_case(tenant, jpeg_bytes)
    tight = settings.model_copy(update={"gradcam_budget_seconds": 1e-6})
    assert run_classification(tight, case_id) == "succeeded"
    body = client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()
    assert body["status"] == "succeeded" and body["result"]["gradcam_status"] == "timeout"
    assert abs(sum(body["result"]["probabilities"].values()) - 1) < 1e-6
    heat = client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers)
    assert heat.status_code == 404 and heat.json()["code"] == "heatmap_unavailable"
    assert body["links"]["heatmap"] is None  # no link to a heat map that is not there
    listed = client.get("/v1/cases", headers=tenant.headers).json()["items"]
    assert next(row for row in listed if row["id"] == str(case_id))["links"]["heatmap"] is None


def test_a_case_whose_task_began_near_the_soft_limit_keeps_its_answer_without_a_heat_map(  # type: ignore[no-untyped-def]
    tenant, store_case, settings, jpeg_bytes: bytes
) -> None:
    # the limit counts from the task's start (a model's load, a retry's requeue), not from the claim:
    # a heat map drawn from what the case alone had used ran into the limit and failed the case
    import time

    from worker import results
    from worker.pipeline import Progress, run_classification

    case_id = store_case(tenant, jpeg_bytes)
    late = Progress(started=time.perf_counter() - settings.task_soft_time_limit + results.STORE_SECONDS / 2)
    assert run_classification(settings, case_id, late) == "succeeded"
    with session_scope(settings) as session:
        result = session.get(Result, case_id)
        assert result is not None and result.gradcam_status == "timeout"


def test_a_soft_limit_that_runs_out_while_the_callback_is_sent_leaves_the_case_succeeded(  # type: ignore[no-untyped-def]
    tenant, store_case, settings, jpeg_bytes: bytes, client, monkeypatch
) -> None:
    # the result was committed; the limit ran out sending its callback's message: the store was taken
    # for one that failed, the case counted as superseded (its answer discarded, the log said)
    from celery.exceptions import SoftTimeLimitExceeded

    from core import enqueue
    from core.models import CallbackDelivery
    from worker.pipeline import run_classification

    registered = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": "http://127.0.0.1:9/hook"})
    assert registered.status_code == 200, registered.text
    case_id = store_case(tenant, jpeg_bytes)

    def out_of_time(*args: object) -> bool:
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(enqueue, "send", out_of_time)
    assert run_classification(settings, case_id) == "succeeded"
    with session_scope(settings) as session:  # its callback is the sweeper's to send
        delivery = session.get(CallbackDelivery, case_id)
        assert delivery is not None and delivery.status == "pending"
    assert case_row(settings, case_id).status == "succeeded"


def test_a_case_for_nothing_is_ignored(settings) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_classification

    assert run_classification(settings, uuid.uuid4()) == "skipped"


@pytest.mark.parametrize("argument", ["not-a-uuid", 123, ["a", "list"], None], ids=["text", "number", "list", "none"])
def test_a_message_whose_argument_is_not_a_case_id_is_ignored(argument: object) -> None:
    from worker import callback_tasks, tasks

    assert tasks.classify.apply(args=[argument]).get() == "ignored"
    assert callback_tasks.deliver_callback.apply(args=[argument]).get() == "ignored"


def test_a_failure_before_a_claim_never_ends_another_workers_attempt(tenant, store_case, settings, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    # A worker whose model fails to load fails the case of its message without having claimed it. If
    # another worker runs that case meanwhile (a redelivered message), that attempt is not its to end.
    from core import case_claims, case_states

    running, queued = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    with session_scope(settings) as session:
        assert case_claims.claim_case(session, running) is not None
    with session_scope(settings) as session:
        assert not case_states.fail_case(session, case_id=running, attempt=None, code="model_error", message="x")
        assert case_states.fail_case(session, case_id=queued, attempt=None, code="model_error", message="x")
    assert (case_row(settings, running).status, case_row(settings, queued).status) == ("running", "failed")
    with session_scope(settings) as session:  # its own attempt still ends it
        assert case_states.fail_case(session, case_id=running, attempt=1, code="model_error", message="x")
