"""Faults that take more than one child with them, with real processes: the worker's main process
killed (kill -9, an OOM kill of the whole container) while a case runs or while it holds a retry's
message, and a child killed while it holds a batch of several cases.

Each ends as the others in tests/faults do: every case that got 202 reaches a terminal state once,
with one result, within the sweeper's bounds (its interval and grace, the hard time limit), not the
broker's visibility timeout.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from core import recovery
from tests import support
from tests.faults.conftest import FaultStack, worker_children

pytestmark = pytest.mark.slow


def test_kill_9_of_the_main_process_mid_case_loses_neither_the_running_nor_the_waiting_case(
    stack: FaultStack,
) -> None:
    """The pool's child does not outlive its main process for long, and the running case's message stays
    unacknowledged in Redis: the sweeper requeues the case after the hard limit and grace. The case
    queued behind it was never delivered (prefetch 1): a new worker takes it from the queue."""
    worker = stack.start_worker("main-kill9", {"sleep": 4, "times": 1})
    running = stack.accepted(stack.images[0])
    stack.wait_injected(worker)
    waiting = stack.accepted(stack.images[1])
    children = worker_children(worker.proc.pid)
    killed_at = time.monotonic()
    os.kill(worker.proc.pid, signal.SIGKILL)
    assert worker.proc.wait(10) == -signal.SIGKILL
    support.wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), timeout=15, what="orphans")
    assert stack.case(running).status == "running" and stack.case(waiting).status == "queued"

    stack.start_worker("after-main-kill9")
    bound = stack.settings.task_time_limit + stack.settings.running_grace_seconds + 15
    for case_id, attempts in ((running, 2), (waiting, 1)):
        case = stack.wait_terminal(case_id, timeout=max(1.0, bound - (time.monotonic() - killed_at)))
        assert (case.status, case.attempts) == ("succeeded", attempts), (case.status, case.failure_code)
        assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}


def test_a_case_waiting_out_a_retry_in_a_killed_worker_is_sent_again_by_the_sweeper(stack: FaultStack) -> None:
    """A transient error (here MemoryError) puts the case back in the queue and its task retries after a
    countdown, the retry's message held unacknowledged by the worker's main process. Killed then, the
    main process takes the message with it until Redis's visibility timeout (60 s here, 300 s by
    default): the sweeper took it for a waiting message and left the case queued all that while."""
    # three transient errors, the third followed by a countdown of 2-6 s; attempts to spare for them
    worker = stack.start_worker("retry-kill9", {"memory_error": True, "times": 3}, DERMQ_MAX_ATTEMPTS="5")
    case_id = stack.accepted()
    stack.wait_injected(worker, times=3)
    stack.wait_status(case_id, "queued", timeout=5)  # put back; its retry waits in the worker
    broker = redis.Redis.from_url(stack.broker.url)
    try:
        assert str(case_id) in recovery.broker_case_ids(broker)  # delivered, unacknowledged
    finally:
        broker.close()
    os.kill(worker.proc.pid, signal.SIGKILL)
    assert worker.proc.wait(10) == -signal.SIGKILL
    republished = stack.sweeper.totals["republished"]

    stack.start_worker("after-retry-kill9", DERMQ_MAX_ATTEMPTS="5")
    bound = stack.settings.requeue_grace_seconds + 10 * stack.settings.sweep_interval_seconds + 10
    assert bound < stack.settings.broker_visibility_timeout
    case = stack.wait_terminal(case_id, timeout=bound)
    assert (case.status, case.attempts) == ("succeeded", 4), (case.status, case.failure_code, case.failure_message)
    assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert stack.sweeper.totals["republished"] > republished


def test_kill_9_of_a_child_holding_a_batch_brings_every_case_back_once(stack: FaultStack) -> None:
    """Every case of the batch is running in the killed child: the lead's message comes back at once
    and is skipped, the companions' were dropped or skipped; the sweeper requeues all of them after the
    hard limit and grace, each counted one attempt for the batch, and each then runs alone."""
    batch = [stack.accepted(image) for image in stack.images[:4]]  # queued before a worker is up: one batch
    worker = stack.start_worker("batch-kill9", {"sleep": 5, "times": 1})
    stack.wait_injected(worker)
    assert {stack.case(case_id).status for case_id in batch} == {"running"}
    (child,) = worker_children(worker.proc.pid)
    killed_at = time.monotonic()
    os.kill(child, signal.SIGKILL)

    bound = stack.settings.task_time_limit + stack.settings.running_grace_seconds + 15
    for case_id in batch:
        case = stack.wait_terminal(case_id, timeout=bound - (time.monotonic() - killed_at))
        assert (case.status, case.attempts) == ("succeeded", 2), (case.status, case.failure_code)
        assert stack.counts(case_id) == {"results": 1, "images": 1, "heatmaps": 1}
    assert stack.injected(worker) == 1 and worker.alive() and worker.ping()
    support.wait_for(lambda: worker_children(worker.proc.pid) not in ([], [child]), timeout=10, what="a new child")
