"""Worker faults with real processes: a child killed mid-classification, soft and hard time limits, a
poison case that kills its worker every time, GPU out of memory, and a warm shutdown during a job.

Each ends the same way: every case that got 202 reaches ``succeeded`` or ``failed`` once, with at
most one result row, and nothing stays ``running``. The faults are acted out by the worker's model
(``tests.faults.worker_app``); the tests watch case rows, the worker's processes, its metrics and its
answers to the Celery control API, never its log.
"""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
from PIL import Image
from sqlalchemy import func, select

from core.db import session_scope
from core.models import AuditEvent, Result
from tests.faults.conftest import FaultStack, worker_children

pytestmark = pytest.mark.slow


def claims(stack: FaultStack, case_id: object) -> int:
    with session_scope(stack.settings) as session:
        return session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.start")
        )


def test_kill_9_of_the_child_mid_classification_still_ends_in_one_result(stack: FaultStack) -> None:
    worker = stack.start_worker("kill9", {"sleep": 3, "times": 1})
    case_id = stack.accepted()
    stack.wait_injected(worker)
    assert stack.case(case_id).status == "running"
    children = worker_children(worker.proc.pid)
    assert len(children) == 1, children
    skipped = worker.metric("dermq_jobs_total", outcome="skipped")
    os.kill(children[0], signal.SIGKILL)

    case = stack.wait_terminal(case_id)
    assert (case.status, case.attempts) == ("succeeded", 2), (case.status, case.failure_code, case.failure_message)
    assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    # The message came back at once (task_reject_on_worker_lost) and was skipped, the case being
    # `running`; the sweeper requeued it after the hard limit + grace, and attempt 2 finished it.
    assert worker.metric("dermq_jobs_total", outcome="skipped") >= skipped + 1
    assert worker.alive() and children[0] not in worker_children(worker.proc.pid)
    assert stack.injected(worker) == 1 and claims(stack, case_id) == 2


def test_a_job_past_its_soft_limit_fails_cleanly_with_timeout(stack: FaultStack) -> None:
    worker = stack.start_worker("soft", {"sleep": 60})
    children = worker_children(worker.proc.pid)
    case_id = stack.accepted()
    case = stack.wait_terminal(case_id, timeout=60)
    assert (case.status, case.failure_code, case.attempts) == ("failed", "timeout", 1)
    assert f"{stack.settings.task_soft_time_limit:g} s time limit" in case.failure_message
    elapsed = (case.finished_at - case.started_at).total_seconds()
    assert stack.settings.task_soft_time_limit - 0.5 <= elapsed < stack.settings.task_time_limit
    assert stack.counts(case_id) == {"results": 0, "images": 1, "heatmaps": 0}
    # The soft limit ended the job inside its child: no hard kill, the same child serves on.
    assert worker.alive() and worker_children(worker.proc.pid) == children
    assert worker.ping() and stack.injected(worker) == 1


def test_a_batch_past_its_soft_limit_sends_every_case_back_to_run_alone(stack: FaultStack) -> None:
    """A batch out of time cannot tell which case spent it: the case whose message led the batch goes
    back to the queue with the others (it used to end failed: timeout, on its first attempt), and
    each runs again alone."""
    lead, mate = stack.accepted(), stack.accepted()  # both queued before a worker is up: one batch
    worker = stack.start_worker("softbatch", {"sleep": 60, "times": 1})
    for case_id in (lead, mate):
        case = stack.wait_terminal(case_id, timeout=90)
        assert (case.status, case.attempts) == ("succeeded", 2), (case.status, case.failure_code, case.failure_message)
        assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert stack.injected(worker) == 1 and worker.alive()
    assert worker.metric("dermq_jobs_total", outcome="requeued") == 1


def test_a_job_past_its_hard_limit_is_killed_and_the_sweeper_takes_over(stack: FaultStack) -> None:
    # Blocking the soft-limit signal stands for native code that never returns to Python.
    worker = stack.start_worker("hard", {"sleep": 60, "ignore_soft_limit": True, "times": 1})
    children = worker_children(worker.proc.pid)
    case_id = stack.accepted()
    stack.wait_injected(worker)
    case = stack.wait_terminal(case_id, timeout=90)
    assert (case.status, case.attempts) == ("succeeded", 2), (case.status, case.failure_code, case.failure_message)
    # The hard limit killed the child that ignored the soft one; the pool replaced it.
    replaced = worker_children(worker.proc.pid)
    assert len(replaced) == 1 and not set(replaced) & set(children), (children, replaced)
    elapsed = (case.finished_at - case.created_at).total_seconds()
    assert elapsed >= stack.settings.task_time_limit
    assert stack.counts(case_id)["results"] == 1
    assert claims(stack, case_id) == 2


def test_a_poison_case_ends_failed_after_the_attempt_limit_instead_of_looping(stack: FaultStack) -> None:
    worker = stack.start_worker("poison", {"exit": True})
    case_id = stack.accepted()
    case = stack.wait_terminal(case_id, timeout=120)
    limit = stack.settings.max_attempts
    assert (case.status, case.failure_code, case.attempts) == ("failed", "timeout", limit)
    assert f"none of {limit} attempts finished" in case.failure_message
    assert "stops the worker" in case.failure_message
    # The loop is over: no further claim, however long we wait (the worker lives on, its pool refilled).
    time.sleep(3 * stack.settings.sweep_interval_seconds + 1)
    assert stack.case(case_id).status == "failed" and claims(stack, case_id) == limit
    assert stack.counts(case_id)["results"] == 0
    assert worker.alive() and stack.injected(worker) == limit
    assert worker.ping() and len(worker_children(worker.proc.pid)) == 1


def test_a_poison_case_fails_alone_and_the_cases_batched_with_it_succeed(stack: FaultStack) -> None:
    """A batch shares its worker's death: every case it held is requeued. A case claimed before then
    runs alone (core.case_claims), so the poison case's batch-mates lose one attempt, not all."""
    out = io.BytesIO()
    Image.open(io.BytesIO(stack.images[0])).resize((320, 240)).save(out, "JPEG")
    poison = stack.accepted(out.getvalue())  # the oldest: its message leads the first batch
    innocent = [stack.accepted(image) for image in stack.images[:3]]
    worker = stack.start_worker("poison-batch", {"exit": True, "exit_with_size": [320, 240]})
    limit = stack.settings.max_attempts
    for case_id in innocent:
        case = stack.wait_terminal(case_id, timeout=120)
        assert (case.status, case.attempts) == ("succeeded", 2), case.failure_message  # the first batch's death
    case = stack.wait_terminal(poison, timeout=120)
    assert (case.status, case.failure_code, case.attempts) == ("failed", "timeout", limit)
    assert stack.injected(worker) == limit and worker.alive()


def test_gpu_out_of_memory_runs_that_case_on_the_cpu_and_records_it(stack: FaultStack) -> None:
    worker = stack.start_worker("oom", {"oom": True, "times": 1})
    first = stack.accepted(stack.images[0])
    second = stack.accepted(stack.images[1])
    for case_id in (first, second):
        case = stack.wait_terminal(case_id)
        assert (case.status, case.attempts) == ("succeeded", 1), case.failure_message
    with session_scope(stack.settings) as session:
        rows = session.scalars(select(Result).where(Result.case_id.in_([first, second])))
        devices = {row.case_id: row.device for row in rows}
    # One out-of-memory error, taken on the CPU predictor: both cases succeeded on their first attempt.
    assert devices == {first: "cpu", second: "cpu"}
    assert stack.injected(worker) == 1 and worker.alive()


def test_sigterm_finishes_the_running_job_and_loses_no_queued_one(stack: FaultStack) -> None:
    worker = stack.start_worker("deploy", {"sleep": 3})
    running = stack.accepted(stack.images[0])
    stack.wait_injected(worker)  # its batch is claimed: the next case waits for a free child
    assert any(str(running) in str(task["args"]) for task in worker.active())  # the control API agrees
    waiting = stack.accepted(stack.images[1])
    os.kill(worker.proc.pid, signal.SIGTERM)  # what Kubernetes and `docker stop` send to the main process
    assert worker.proc.wait(60) == 0
    # A warm shutdown: the running job finished before the worker exited.
    case = stack.case(running)
    assert (case.status, case.attempts) == ("succeeded", 1), (case.status, case.failure_code)
    assert stack.case(waiting).status == "queued"  # never started: its message is still in Redis

    stack.start_worker("after-deploy")
    case = stack.wait_terminal(waiting)
    assert (case.status, case.attempts) == ("succeeded", 1)
    assert stack.counts(running)["results"] == 1 and stack.counts(waiting)["results"] == 1
