"""Dynamic batching: its answers equal one-at-a-time answers, it is stored in a fixed number of
statements, a message whose case a batch already took does nothing, and a failure part-way fails
only the case at fault (claiming: tests/worker/test_batch_claims.py).

A batch claims the oldest queued cases of its whole database: these tests run on a database of their
own (``own_database``), where every queued case is one of theirs."""

from __future__ import annotations

import dataclasses
import threading
import uuid

import numpy as np
import pytest
import redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError

from core import audit, case_claims, case_states, recovery
from core import results as core_results
from core.crypto import decrypt_blob
from core.db import session_scope
from core.models import AuditEvent, BlobKind, Case, CaseBlob, Result
from core.queueing import QUEUE_CASES
from ml.images import decode
from tests import support
from tests.conftest import own_database_fixtures
from worker import runtime
from worker.batching import run_batch
from worker.pipeline import Progress, run_classification

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py


@pytest.fixture
def batching(own_database):  # type: ignore[no-untyped-def]
    """Batching on, batches of up to 4, on this module's own database."""
    return own_database.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})


tenant, store_case = own_database_fixtures()


def test_batching_is_on_unless_turned_off(settings, batching) -> None:  # type: ignore[no-untyped-def]
    assert settings.batching == "auto"
    assert runtime.batching_enabled(settings)  # on the CPU too: a batch's bookkeeping costs about one case's
    assert runtime.batching_enabled(batching)
    assert not runtime.batching_enabled(settings.model_copy(update={"batching": "off"}))
    assert not runtime.batching_enabled(settings.model_copy(update={"batch_max_size": 1}))


def test_batched_answers_equal_one_at_a_time(batching, tenant, store_case, keyring, fixture_images) -> None:  # type: ignore[no-untyped-def]
    images = [fixture_images[k].read_bytes() for k in sorted(fixture_images)[:6]]
    ids = [store_case(tenant, data) for data in images]
    progress = Progress()
    assert run_batch(batching, ids[0], progress) == "succeeded" and progress.attempt == 1
    with session_scope(batching) as session:
        done = {row.id: row for row in session.scalars(select(Case).where(Case.id.in_(ids)))}
        timings = {r.case_id: r.timings for r in session.scalars(select(Result).where(Result.case_id.in_(ids)))}
    taken = [i for i in ids if done[i].status == "succeeded"]
    assert ids[0] in taken and 2 <= len(taken) <= 4 and {timings[i].get("batch_size") for i in taken} - {None}
    # each case's wait in the queue ends at the claim, one moment for the whole batch (it ended after
    # the decodes of the cases before it, and the queue's wait counted the worker's time)
    claimed = [done[i].created_at.timestamp() + timings[i]["queue_wait"] for i in taken]
    assert max(claimed) - min(claimed) < 1e-4
    # The cases the batch took: their own messages now do nothing.
    for case_id in taken[1:]:
        assert run_classification(batching, case_id) == "skipped"
    for case_id in ids:
        if case_id not in taken:
            assert run_batch(batching, case_id) in ("succeeded", "skipped")
    predictor = runtime.get_predictor(batching)
    with session_scope(batching) as session:
        results = core_results.read_results(session, keyring, ids)  # the findings, opened
    assert set(results) == set(ids)
    for case_id, data in zip(ids, images, strict=True):
        alone = predictor.predict([decode(data, reduce_to=batching.overlay_max_side).image])[0]
        stored = results[case_id]
        assert stored.label == alone.label
        np.testing.assert_allclose(
            [stored.probabilities[c] for c in alone.probabilities], list(alone.probabilities.values()), atol=1e-5
        )


def taken_messages(case_ids: list[uuid.UUID]) -> set[str]:
    """The ids among ``case_ids`` that have a classify message waiting in the broker; those messages
    are taken out (no worker of this module reads them, and the next test must not find them)."""
    from worker.celery_app import app  # the worker's publisher, whose broker the tasks go to

    client = redis.Redis.from_url(app.conf.broker_url)
    wanted, found = {str(i) for i in case_ids}, set()
    for name in recovery.queue_lists(QUEUE_CASES):
        for raw in client.lrange(name, 0, -1):
            case_id = recovery._case_id_of(raw)
            if case_id in wanted:
                found.add(case_id)
                client.lrem(name, 0, raw)
    return found


def _completion(case_id: uuid.UUID, attempt: int, label: str = "nv") -> case_states.Completion:
    probabilities = dict.fromkeys(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 0.0) | {label: 1.0}
    result = {
        "label": label,
        "probabilities": probabilities,
        "confidence": 1.0,
        "uncertainty": 0.0,
        "referral": False,
        "referral_reasons": [],
        "gradcam_status": "ok",
        "gradcam_class": label,
        "model_id": "test-model",
        "weights_sha256": "0" * 64,
        "device": "cpu",
        "timings": {"total": 0.01},
        "input_stats": {},
    }
    return case_states.Completion(case_id, attempt, result, b"\x89PNG heat map of " + str(case_id).encode())


def test_the_working_copies_of_ended_cases_go_and_cases_without_one_cost_no_delete(
    batching, tenant, store_case, keyring, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    plain, copied = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes, working_copy=b"working copy")
    with session_scope(batching) as session:
        case_claims.claim_batch(session, plain, limit=2)
    for case_id, working_copy in ((plain, False), (copied, True)):
        completion = dataclasses.replace(_completion(case_id, 1), working_copy=working_copy)
        with support.statements_sent(batching) as statements, session_scope(batching) as session:
            assert case_states.complete_cases(session, keyring=keyring, completions=[completion]) == {case_id}
        assert any(s.upper().startswith("DELETE") for s in statements) is working_copy, statements
    with session_scope(batching) as session:
        kinds = session.execute(select(CaseBlob.case_id, CaseBlob.kind).where(CaseBlob.case_id == copied)).all()
    assert BlobKind.WORKING.value not in {kind for _, kind in kinds}


def test_a_batch_is_stored_in_a_fixed_number_of_statements(batching, tenant, store_case, keyring, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """Storing a batch costs what storing one case costs (that is what makes batches pay on the CPU),
    stores every case's result, heat map and audit event, and leaves the audit chain intact."""
    ids = [store_case(tenant, jpeg_bytes) for _ in range(5)]
    with session_scope(batching) as session:
        claimed = case_claims.claim_batch(session, ids[0], limit=5)
    assert sorted(c.id for c in claimed) == sorted(ids)

    per_transaction = []
    with support.statements_sent(batching) as statements:
        for group in (ids[:1], ids[1:]):
            statements.clear()
            with session_scope(batching) as session:
                stored = case_states.complete_cases(
                    session, keyring=keyring, completions=[_completion(i, 1) for i in group]
                )
            assert stored == set(group)
            per_transaction.append(len(statements))
    assert per_transaction[0] == per_transaction[1], f"statements for 1 case vs 4: {per_transaction}"

    with session_scope(batching) as session:
        assert {c.status for c in session.scalars(select(Case).where(Case.id.in_(ids)))} == {"succeeded"}
        assert len(session.scalars(select(Result).where(Result.case_id.in_(ids))).all()) == 5
        heatmaps = session.scalars(
            select(CaseBlob).where(CaseBlob.case_id.in_(ids), CaseBlob.kind == BlobKind.HEATMAP.value)
        ).all()
        assert len(heatmaps) == 5
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "case.classify", AuditEvent.entity_id.in_([str(i) for i in ids]))
            .order_by(AuditEvent.id)
        ).all()
        assert [e.entity_id for e in events] == [str(i) for i in ids]
        assert {e.clinic_id for e in events} == {tenant.clinic_id}
        assert audit.verify_chain(session).ok
    for case_id in ids:
        with session_scope(batching) as session:
            blob = session.scalar(
                select(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == BlobKind.HEATMAP.value)
            )
            assert blob is not None
            assert decrypt_blob(keyring, blob.sealed, case_id=case_id, kind=BlobKind.HEATMAP.value).endswith(
                str(case_id).encode()
            )


def test_a_message_for_a_case_a_batch_took_costs_one_read(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A batch of n leaves n - 1 messages whose cases it took: each ends after one primary-key read,
    claims nothing, writes nothing and audits nothing (7 of every 8 messages under load)."""
    ids = [store_case(tenant, jpeg_bytes) for _ in range(3)]
    with session_scope(batching) as session:
        case_claims.claim_batch(session, ids[0], limit=3)
        events_before = session.scalar(select(func.count()).select_from(AuditEvent))
    runtime.get_predictor(batching)  # loaded before counting: run_batch asks for it first
    with support.statements_sent(batching) as statements:
        assert run_batch(batching, ids[1]) == "skipped"
    assert len(statements) == 1 and _last(statements[0]).startswith("SELECT"), statements
    with session_scope(batching) as session:
        assert {(c.status, c.attempts) for c in session.scalars(select(Case).where(Case.id.in_(ids)))} == {
            ("running", 1)
        }
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == events_before


def test_an_idle_case_costs_two_transactions_that_do_not_wait_for_the_disk(
    batching, tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """A lone case (an idle queue) is looked at, claimed and read in one transaction and stored in a
    second, both committed without waiting for the WAL flush (a lost one is redone: docs/OPERATIONS.md)
    and without a round trip per transaction to say so (it rides with the first statement): each round
    trip is one that an idle case waits for, on the API's side too."""
    case_id = store_case(tenant, jpeg_bytes)
    runtime.get_predictor(batching)  # loaded before counting: run_batch asks for it first
    this_thread = threading.get_ident()  # not another test's work in this process (a worker thread's)
    with (
        support.commit_settings(lambda: threading.get_ident() == this_thread) as commits,
        support.statements_sent(batching) as statements,
    ):
        assert run_batch(batching, case_id) == "succeeded"
    assert commits == ["off", "off"], commits
    assert not [s for s in statements if _last(s).startswith("SET ")], statements  # no SET sent alone
    assert len([s for s in statements if s.upper().startswith("SET LOCAL SYNCHRONOUS_COMMIT")]) == 2, statements
    assert _last(statements[0]).startswith("SELECT CASES.STATUS"), statements


def _last(sent: str) -> str:
    """The last statement of what one round trip sent (:mod:`core.deferred` puts others in front of it)."""
    return sent.rstrip().rstrip(";").rsplit(";", 1)[-1].strip().upper()


def test_a_stale_completion_in_a_batch_writes_nothing(batching, tenant, store_case, keyring, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A case taken over meanwhile (its attempt moved on) is left out of the batch's transaction; the
    others are stored."""
    ids = [store_case(tenant, jpeg_bytes) for _ in range(3)]
    with session_scope(batching) as session:
        case_claims.claim_batch(session, ids[0], limit=3)
    with session_scope(batching) as session:  # the sweeper requeued ids[1] and another worker took it
        assert case_states.requeue_case(session, ids[1], attempt=1, reason="test")
        assert case_claims.claim_case(session, ids[1]) is not None
    with session_scope(batching) as session:
        stored = case_states.complete_cases(session, keyring=keyring, completions=[_completion(i, 1) for i in ids])
    assert stored == {ids[0], ids[2]}
    with session_scope(batching) as session:
        stale = session.get(Case, ids[1])
        assert stale is not None and stale.status == "running" and stale.attempts == 2
        assert session.get(Result, ids[1]) is None
        assert session.scalar(select(CaseBlob.id).where(CaseBlob.case_id == ids[1], CaseBlob.kind == "heatmap")) is None
        assert not session.scalars(
            select(AuditEvent).where(AuditEvent.action == "case.classify", AuditEvent.entity_id == str(ids[1]))
        ).all()


def test_a_batch_stopped_by_a_lost_database_puts_its_other_cases_back(
    batching, tenant, store_case, fixture_images
) -> None:  # type: ignore[no-untyped-def]
    """A transient error part-way through a batch (the connection drops as it stores) leaves its lead
    case to the task's retry and puts the other cases it claimed back in the queue at once, rather
    than leaving them running until the sweeper."""
    images = [fixture_images[k].read_bytes() for k in sorted(fixture_images)[:3]]
    ids = [store_case(tenant, data) for data in images]

    with support.connection_lost_on(batching, "results"), pytest.raises(OperationalError) as lost:
        run_batch(batching, ids[0])
    assert lost.value.connection_invalidated  # a real lost connection, not a refused statement
    with session_scope(batching) as session:
        status = {c.id: (c.status, c.attempts) for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
        requeues = session.scalars(
            select(AuditEvent.entity_id).where(
                AuditEvent.action == "case.requeue", AuditEvent.entity_id.in_([str(i) for i in ids[1:]])
            )
        ).all()
    assert status[ids[0]] == ("running", 1)  # the task's handler requeues it and retries
    assert status[ids[1]] == status[ids[2]] == ("queued", 1)
    assert sorted(requeues) == sorted(str(i) for i in ids[1:])
    # each with a message of its own: claimed before, only its own message takes it (core.case_claims)
    assert taken_messages(ids[1:]) == {str(i) for i in ids[1:]}
    for case_id in ids[1:]:
        assert run_batch(batching, case_id) == "succeeded"


def test_a_case_that_breaks_the_model_fails_alone_not_its_batch(
    batching, tenant, store_case, fixture_images, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """If a batch's pass fails, its cases are classified one by one: only the case that breaks the
    model fails (model_error), whether or not it leads the batch; the others get their results."""
    images = [fixture_images[k].read_bytes() for k in sorted(fixture_images)[:4]]
    ids = [store_case(tenant, data) for data in images]
    predictor = runtime.get_predictor(batching)
    poison = decode(images[2], reduce_to=batching.overlay_max_side).image.tobytes()
    original = predictor.classify

    def classify(batch):  # type: ignore[no-untyped-def]
        if any(image.tobytes() == poison for image in batch):
            raise ValueError("this image breaks the model")
        return original(batch)

    monkeypatch.setattr(predictor, "classify", classify)
    assert run_batch(batching, ids[0]) == "succeeded"
    with session_scope(batching) as session:
        done = {c.id: (c.status, c.failure_code) for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
        results = set(session.scalars(select(Result.case_id).where(Result.case_id.in_(ids))))
    assert done[ids[2]] == ("failed", "model_error")
    assert all(done[i] == ("succeeded", None) for i in ids if i != ids[2])
    assert results == set(ids) - {ids[2]}


def test_a_case_the_database_refuses_fails_alone_not_its_batch(
    batching, tenant, store_case, keyring, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """If the batch's transaction fails (here: one case already has a result row, which the primary
    key refuses), each case is stored on its own: that case fails, the others succeed."""
    from worker import pipeline

    ids = [store_case(tenant, jpeg_bytes) for _ in range(3)]
    with session_scope(batching) as session:
        case_claims.claim_batch(session, ids[0], limit=3)
    with session_scope(batching) as session:
        session.add(Result(case_id=ids[1], **_completion(ids[1], 1, "mel").result))
    outcomes = pipeline._store(batching, [_completion(i, 1) for i in ids])
    assert outcomes == {ids[0]: "succeeded", ids[1]: "failed", ids[2]: "succeeded"}
    with session_scope(batching) as session:
        refused = session.get(Case, ids[1])
        assert refused is not None and (refused.status, refused.failure_code) == ("failed", "model_error")
        assert {session.get(Case, i).status for i in (ids[0], ids[2])} == {"succeeded"}  # type: ignore[union-attr]
        assert audit.verify_chain(session).ok


def test_a_case_whose_image_cannot_be_read_fails_alone_and_its_batch_goes_on(
    batching, tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    ids = [store_case(tenant, jpeg_bytes) for _ in range(4)]
    with session_scope(batching) as session:  # one image gone, one that no longer decrypts
        session.execute(delete(CaseBlob).where(CaseBlob.case_id == ids[1]))
        session.execute(update(CaseBlob).where(CaseBlob.case_id == ids[2]).values(nonce=bytes(12)))
    assert run_batch(batching, ids[0]) == "succeeded"  # led by a good case: it and the other good one end well
    assert run_batch(batching, ids[1]) == "skipped"  # the batch ended it: its own message does nothing
    with session_scope(batching) as session:
        cases = {c.id: c for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
    assert [cases[i].status for i in ids] == ["succeeded", "failed", "failed", "succeeded"]
    for case_id, error in ((ids[1], "NotFound"), (ids[2], "DecryptionError")):
        assert cases[case_id].failure_code == "model_error" and cases[case_id].attempts == 1
        assert f"reading its stored image ({error})" in (cases[case_id].failure_message or "")
    led = [store_case(tenant, jpeg_bytes) for _ in range(2)]  # a batch led by an unreadable case fails it alone
    with session_scope(batching) as session:
        session.execute(delete(CaseBlob).where(CaseBlob.case_id == led[0]))
    assert run_batch(batching, led[0]) == "failed"
    with session_scope(batching) as session:
        assert session.scalar(select(Case.status).where(Case.id == led[1])) == "succeeded"


def test_blobs_malformed_in_their_row_fail_their_own_cases_only(batching, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A nonce or wrapped key cut short, or a key id that names no period, made AES-GCM or the period
    folder raise ValueError, which rolled the whole claim back and failed the batch's good lead; the
    malformed case stayed queued to do the same to the next batch that took it as a companion."""
    ids = [store_case(tenant, jpeg_bytes) for _ in range(4)]  # a batch's worth here
    malformed = {ids[1]: {"nonce": bytes(4)}, ids[2]: {"wrapped_key": bytes(5)}, ids[3]: {"kek_id": "period-garbage"}}
    with session_scope(batching) as session:
        for case_id, values in malformed.items():
            session.execute(update(CaseBlob).where(CaseBlob.case_id == case_id).values(**values))
    assert run_batch(batching, ids[0]) == "succeeded"
    with session_scope(batching) as session:
        cases = {c.id: c for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
    assert [cases[i].status for i in ids] == ["succeeded", "failed", "failed", "failed"]
    for case_id in malformed:
        assert cases[case_id].failure_code == "model_error" and cases[case_id].attempts == 1
        assert "reading its stored image (DecryptionError)" in (cases[case_id].failure_message or "")


def test_a_case_whose_key_cannot_be_loaded_goes_back_to_the_queue_and_its_batch_goes_on(  # type: ignore[no-untyped-def]
    batching, tenant, store_case, jpeg_bytes
) -> None:
    """Its period's key file became readable by others (a careless restore): loading that key raises
    KeyringError, which used to roll the whole batch's claim back, then failed the case for good. An
    operator's to mend, not the case's: it waits in the queue, its attempt given back (counted, a long
    outage spent them all), and each later claim reads the key again (here: mended, but the wrong key
    for its image, which fails it)."""
    from core.crypto import load_keyring

    folder = load_keyring(batching).periods
    assert folder is not None
    ids = [store_case(tenant, jpeg_bytes) for _ in range(3)]
    exposed = folder.ensure("2025-01")
    key_file = folder._key_file("2025-01")
    try:
        key_file.chmod(0o644)
        with session_scope(batching) as session:
            session.execute(update(CaseBlob).where(CaseBlob.case_id == ids[1]).values(kek_id=exposed))
        assert run_batch(batching, ids[0]) == "succeeded"
        with session_scope(batching) as session:
            cases = {c.id: c for c in session.scalars(select(Case).where(Case.id.in_(ids)))}
        assert [cases[i].status for i in ids] == ["succeeded", "queued", "succeeded"]
        assert cases[ids[1]].attempts == 0 and cases[ids[1]].failure_code is None
        for _ in range(4):  # led by it, again and again: the same, nothing else taken, nothing spent
            assert run_batch(batching, ids[1]) == "requeued"
        key_file.chmod(0o600)
        assert run_batch(batching, ids[1]) == "failed"
        with session_scope(batching) as session:
            case = session.get(Case, ids[1])
            assert case is not None and case.attempts == 1 and case.failure_code == "model_error"
            assert "reading its stored image (DecryptionError)" in (case.failure_message or "")
    finally:
        key_file.unlink()
