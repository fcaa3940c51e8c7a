"""Dynamic batching: a batch claims cases in one statement without ever taking one twice, its answers
equal one-at-a-time answers, and a message whose case a batch already took does nothing."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
from sqlalchemy import select, update

from core import cases
from core.db import session_scope
from core.models import Case, Result
from ml.images import decode
from worker import runtime
from worker.tasks import Progress, batching_enabled, run_batch, run_classification

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def batching(settings):  # type: ignore[no-untyped-def]
    """Batching on, and an empty queue: a batch takes the oldest queued cases, and cases that earlier
    tests left queued in the shared test database (nothing publishes them) would be older than ours."""
    with session_scope(settings) as session:
        session.execute(
            update(Case)
            .where(Case.status == "queued")
            .values(status="failed", failure_code="abandoned", failure_message="left queued by an earlier test")
        )
    return settings.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})


def test_batching_is_off_on_the_cpu_unless_asked(settings, batching) -> None:  # type: ignore[no-untyped-def]
    predictor = runtime.get_predictor(settings)
    assert predictor.device.type == "cpu"
    assert not batching_enabled(settings, predictor)  # auto: on only for CUDA workers
    assert batching_enabled(batching, predictor)


def test_batched_answers_equal_one_at_a_time(batching, tenant, store_case, fixture_images) -> None:  # type: ignore[no-untyped-def]
    images = [fixture_images[k].read_bytes() for k in sorted(fixture_images)[:6]]
    ids = [store_case(tenant, data) for data in images]
    progress = Progress()
    assert run_batch(batching, ids[0], progress) == "succeeded" and progress.attempt == 1
    with session_scope(batching) as session:
        done = {row.id: row for row in session.scalars(select(Case).where(Case.id.in_(ids)))}
        batch_sizes = {
            r.case_id: r.timings.get("batch_size")
            for r in session.scalars(select(Result).where(Result.case_id.in_(ids)))
        }
    taken = [i for i in ids if done[i].status == "succeeded"]
    assert ids[0] in taken and 2 <= len(taken) <= 4 and set(batch_sizes.values()) - {None}
    # The cases the batch took: their own messages now do nothing.
    for case_id in taken[1:]:
        assert run_classification(batching, case_id) == "skipped"
    for case_id in ids:
        if case_id not in taken:
            assert run_batch(batching, case_id) in ("succeeded", "skipped")
    predictor = runtime.get_predictor(batching)
    with session_scope(batching) as session:
        results = {r.case_id: r for r in session.scalars(select(Result).where(Result.case_id.in_(ids)))}
    assert set(results) == set(ids)
    for case_id, data in zip(ids, images, strict=True):
        alone = predictor.predict([decode(data, reduce_to=batching.overlay_max_side).image])[0]
        stored = results[case_id]
        assert stored.label == alone.label
        np.testing.assert_allclose(
            [stored.probabilities[c] for c in alone.probabilities], list(alone.probabilities.values()), atol=1e-5
        )


def test_concurrent_batches_never_claim_a_case_twice(batching, tenant, store_case, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    ids = {store_case(tenant, jpeg_bytes) for _ in range(12)}
    taken: list[tuple[uuid.UUID | None, list[uuid.UUID]]] = []
    start = threading.Barrier(4)

    def claim(first: uuid.UUID | None) -> None:
        start.wait()
        with session_scope(batching) as session:
            rows = (
                cases.claim_batch(session, first, limit=4)
                if first is not None
                else cases.claim_queued(session, limit=4)
            )
            taken.append((first, [row.id for row in rows]))

    firsts = sorted(ids)[:3]
    threads = [threading.Thread(target=claim, args=(f,)) for f in [*firsts, None]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [case_id for _, batch in taken for case_id in batch]
    assert len(claimed) == len(set(claimed)), "a case was claimed twice"
    with session_scope(batching) as session:
        attempts = {c.id: c.attempts for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
    assert all(attempts[i] == 1 for i in claimed if i in ids) and all(attempts[i] == 0 for i in ids - set(claimed))
    for first, batch in taken:
        # a batch led by a case that another batch took first comes back empty rather than half-claimed
        if first is not None:
            assert batch == [] or batch[0] == first
