"""The periodic check walks the log again, a slice at a time (core.audit_rewalk): an event the
incremental check had passed, edited afterwards by the tables' owner with its stored leaf kept, fails a
later check. On the insider's database of tests/core/conftest.py, with its witness file."""

from __future__ import annotations

from sqlalchemy import text

from core import audit_resume, audit_rewalk, checkpoint
from core.db import session_scope
from tests.core.audit_roles import record_and_seal, unguarded


def test_an_event_edited_after_the_check_passed_it_fails_a_later_check_and_stays_failed(roles_db) -> None:  # type: ignore[no-untyped-def]
    from worker.sealing import check

    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    ids = record_and_seal(runtime, keys, 4)
    incremental = runtime.model_copy(update={"audit_rewalk_seconds": 0})
    assert check(incremental, keys).ok
    # the owner edits an event the check has passed and keeps its stored leaf (and so every node and root)
    with unguarded(owner, "audit_events") as connection:
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": ids[1]})
    assert check(incremental, keys).ok  # nothing new to walk: the incremental check cannot see it
    report = check(runtime, keys)
    assert not report.ok and report.first_bad_event_id == ids[1], report
    assert "altered" in (report.reason or "")
    again = check(runtime, keys)  # the next check walks over it again (from the beginning: no good place before it)
    assert not again.ok and again.first_bad_event_id == ids[1], again
    with session_scope(runtime) as session:  # what auditors are told (GET /v1/audit-events/verify)
        verdict = audit_resume.latest_verdict(session)
    assert verdict is not None and not verdict.ok and verdict.first_bad_event_id == ids[1]


def test_each_re_walk_goes_on_from_where_the_last_stopped_and_starts_again_at_the_end(roles_db) -> None:  # type: ignore[no-untyped-def]
    runtime = roles_db["runtime"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, 3)  # a signed checkpoint at each size
    witness = runtime.audit_witness_file
    with session_scope(runtime) as session:
        size = session.scalar(text("SELECT max(size) FROM audit_checkpoints"))
        places = []
        for _ in range(size + 2):  # out of time at once: each stops at the first checkpoint it meets
            report = audit_rewalk.step(session, keys.verifiers, witness, seconds=0)
            assert report.ok, report
            place = audit_rewalk.read_place(witness)
            places.append(place.size if place is not None else None)
    # the last checkpoint, then the end (nothing past it): the next cycle starts from the beginning
    assert places == [*range(1, size + 1), None, 1]


def test_a_place_no_signed_checkpoint_vouches_for_restarts_the_cycle(roles_db) -> None:  # type: ignore[no-untyped-def]
    runtime = roles_db["runtime"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, 3)
    witness = runtime.audit_witness_file
    for forged in ('{"size": 2, "frontier": ["' + "A" * 43 + '="]}', "{not json", '{"size": 3, "frontier": []}'):
        audit_rewalk.place_file(witness).write_text(forged)
        with session_scope(runtime) as session:
            report = audit_rewalk.step(session, keys.verifiers, witness, seconds=0)
        place = audit_rewalk.read_place(witness)
        assert report.ok and place is not None and place.size == 1, (forged, report)  # walked from the start
