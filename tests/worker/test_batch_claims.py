"""Claiming a dynamic batch (core.case_claims): concurrent batches never take a case twice, a batch
holds a bounded number of pixels, and only first attempts share a batch.

A batch claims the oldest queued cases of its whole database: these tests run on a database of their
own (``own_database``), where every queued case is one of theirs."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql

from core import case_claims
from core.db import session_scope
from core.models import Case
from tests.conftest import own_database_fixtures

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py


@pytest.fixture
def batching(own_database):  # type: ignore[no-untyped-def]
    """Batches of up to 4, on this module's own database."""
    return own_database.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})


tenant, store_case = own_database_fixtures()


def test_concurrent_batches_never_claim_a_case_twice(batching, tenant, store_case, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    ids = {store_case(tenant, jpeg_bytes) for _ in range(12)}
    taken: list[tuple[uuid.UUID | None, list[uuid.UUID]]] = []
    start = threading.Barrier(4)

    def claim(first: uuid.UUID, topped_up: bool) -> None:
        start.wait()
        with session_scope(batching) as session:
            rows = case_claims.claim_batch(session, first, limit=2 if topped_up else 4)
            if topped_up and rows:  # a GPU worker's batch, filled after its wait
                rows += case_claims.join_batch(session, first, limit=2, batch_size=4)
            taken.append((first, [row.id for row in rows]))

    firsts = sorted(ids)[:4]
    threads = [threading.Thread(target=claim, args=(f, i == 3)) for i, f in enumerate(firsts)]
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
        assert batch == [] or batch[0] == first


def test_a_batch_holds_a_bounded_number_of_pixels(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A case joins a batch only if its image fits the batch's per-slot share of pixels; a large one
    is classified alone (a batch of camera-sized PNGs would otherwise be decoded at once)."""
    small = [store_case(tenant, jpeg_bytes) for _ in range(3)]  # 300x225: 67,500 pixels each
    large = store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:
        session.execute(update(Case).where(Case.id == large).values(image_width=5000, image_height=4000))
    with session_scope(batching) as session:  # 4 slots of 100,000 pixels
        claimed = case_claims.claim_batch(session, small[0], limit=4, max_pixels=400_000)
    assert sorted(c.id for c in claimed) == sorted(small)  # the 20-megapixel case stays queued
    waiting = store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:
        alone = case_claims.claim_batch(session, large, limit=4, max_pixels=400_000)
    assert [c.id for c in alone] == [large]  # no company for a case that needs the whole budget
    with session_scope(batching) as session:
        assert session.get(Case, waiting).status == "queued"


def test_a_case_claimed_before_runs_alone(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A requeued case (its worker died: maybe it is what killed it) neither joins a batch nor takes
    company: a poison case would otherwise spend its batch-mates' attempts with its own."""
    fresh = [store_case(tenant, jpeg_bytes) for _ in range(2)]
    retried = store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:
        session.execute(update(Case).where(Case.id == retried).values(attempts=1))
    with session_scope(batching) as session:
        claimed = case_claims.claim_batch(session, fresh[0], limit=4)
    assert sorted(c.id for c in claimed) == sorted(fresh)  # the retried case stays queued
    later = store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:
        alone = case_claims.claim_batch(session, retried, limit=4)
    assert [(c.id, c.attempts) for c in alone] == [(retried, 2)]
    with session_scope(batching) as session:
        assert session.get(Case, later).status == "queued"  # type: ignore[union-attr]


def test_a_gpu_batch_is_filled_on_the_terms_it_was_claimed_on(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """After its wait a GPU worker tops its batch up: only with first attempts that fit a slot of the
    pixel budget, and not at all when its own case had to run alone."""
    lead, small = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    retried, large = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:
        session.execute(update(Case).where(Case.id == retried).values(attempts=1))
        session.execute(update(Case).where(Case.id == large).values(image_width=5000, image_height=4000))
    bounds = {"batch_size": 4, "max_pixels": 400_000}  # slots of 100,000 pixels; a fixture has 67,500
    with session_scope(batching) as session:
        assert [c.id for c in case_claims.claim_batch(session, lead, limit=1)] == [lead]
        joined = case_claims.join_batch(session, lead, limit=3, **bounds)
    assert [c.id for c in joined] == [small]
    for alone in (retried, large):  # each leads a batch of its own, which takes no company
        later = store_case(tenant, jpeg_bytes)
        with session_scope(batching) as session:
            assert [c.id for c in case_claims.claim_batch(session, alone, limit=1)] == [alone]
            assert case_claims.join_batch(session, alone, limit=3, **bounds) == []
        with session_scope(batching) as session:
            assert session.get(Case, later).status == "queued"  # type: ignore[union-attr]
            session.execute(update(Case).where(Case.id == later).values(status="failed"))  # out of the way


def test_a_batch_out_of_time_right_after_its_claim_puts_every_case_it_took_back(  # type: ignore[no-untyped-def]
    batching, tenant, store_case, jpeg_bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soft time limit can fire at any line: here while the batch marks its companions in Redis,
    just after its claim committed. They went back to the queue only once the sweeper found them
    (the hard limit plus its grace later, an attempt each)."""
    from celery.exceptions import SoftTimeLimitExceeded

    from worker import batching as batches
    from worker.pipeline import Progress

    def out_of_time(*args: object) -> None:
        raise SoftTimeLimitExceeded

    ids = [store_case(tenant, jpeg_bytes) for _ in range(3)]
    monkeypatch.setattr(batches.companions, "mark", out_of_time)
    progress = Progress()
    with pytest.raises(SoftTimeLimitExceeded):
        batches.run_batch(batching, ids[0], progress)
    assert progress.requeued  # the lead too: a batch out of time runs its cases again, alone
    with session_scope(batching) as session:
        assert [session.get(Case, i).status for i in ids] == ["queued"] * 3  # type: ignore[union-attr]


def _plan(session, statement: str, params: dict[str, object]) -> str:  # type: ignore[no-untyped-def]
    """Postgres's plan for ``statement``, where it need not weigh a queue this small against reading
    it whole: whether an index serves it, whatever the queue's length."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    return "\n".join(row[0] for row in session.connection().exec_driver_sql(f"EXPLAIN {statement}", params))


def test_a_claim_reads_the_front_of_the_queue_not_all_of_it(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A batch's company comes from an index in the queue's order: without it each claim worked out
    the decoded pixels of every queued case and sorted them all (49 ms a claim with 3,000 queued),
    slowest when the backlog it drains is longest."""
    lead = store_case(tenant, jpeg_bytes)
    with session_scope(batching) as session:  # a backlog: copies of the lead's row, each a minute older
        session.execute(
            text(
                "INSERT INTO cases (id, clinic_id, status, priority, image_sha256, image_format, image_width, "
                "image_height, image_bytes, attempts, created_at, updated_at) "
                "SELECT gen_random_uuid(), clinic_id, status, priority, image_sha256, image_format, image_width, "
                "image_height, image_bytes, 0, created_at - n * interval '1 minute', updated_at "
                "FROM cases, generate_series(1, 300) n WHERE id = :lead"
            ),
            {"lead": lead},
        )
        session.execute(text("ANALYZE cases"))
    dialect = postgresql.dialect(paramstyle="pyformat")
    for reduce_to in (None, 512):  # a CPU worker's claim and one with the decoder's draft scale
        claim, _ = case_claims._claim_statement(4, 100_000, reduce_to, dialect)
        with session_scope(batching) as session:
            case_claims.prepared.ensure(session.connection(), claim)
            plan = _plan(session, f"EXECUTE {claim.name}(%(case_id)s)", {"case_id": lead})
        assert "ix_cases_queue_order" in plan and "Sort" not in plan, plan
        # a GPU worker's top-up after its wait, as psycopg2 sends it (its values written in)
        candidates = case_claims.join_candidates(lead, 3, 100_000, reduce_to).compile(dialect=dialect)
        with session_scope(batching) as session:
            plan = _plan(session, str(candidates), dict(candidates.params))
        assert "ix_cases_queue_order" in plan and "Sort" not in plan, plan
    with session_scope(batching) as session:  # and the claim still takes the oldest
        claimed = case_claims.claim_batch(session, lead, limit=4, max_pixels=400_000)
        ages = sorted(session.scalars(select(Case.created_at).where(Case.status == "queued")))
    assert claimed[0].id == lead and len(claimed) == 4
    assert max(c.created_at for c in claimed[1:]) < ages[0]


def test_a_case_its_intake_holds_while_confirming_it_on_disk_is_claimed(
    batching, tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """An intake that confirms a case on disk holds its row ``FOR KEY SHARE`` (core.cases.confirm_stored)
    for a commit; the case's own message arriving then must still claim it, not skip it (the case
    then waited for the sweeper, a minute or more)."""
    from core import cases

    lead, company = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    with session_scope(batching) as intake:
        assert cases.confirm_stored(intake, lead) and cases.confirm_stored(intake, company)  # held until commit
        with session_scope(batching) as session:
            claimed = case_claims.claim_batch(session, lead, limit=4)
    assert sorted(c.id for c in claimed) == sorted([lead, company])
