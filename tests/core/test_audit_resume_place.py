"""Where the periodic audit check resumes (core.audit_resume.resume_point): kept beside the witness
file, so that a "good" result a database login inserts moves no check past events it has not
recomputed. On the insider's database of tests/core/conftest.py, with its witness file."""

from __future__ import annotations

from sqlalchemy import text

from core import audit_resume, audit_verify, checkpoint, merkle
from core.config import Settings
from core.db import session_scope
from tests.core.audit_roles import record_and_seal, unguarded


def _forge_a_good_result(runtime: Settings) -> int:
    """A "good" result at the log's end, as the services' login can insert one: the stored tree's own
    size, root and frontier, which a signed checkpoint vouches for. Returns its size."""
    with session_scope(runtime) as session:
        tree = merkle.CompactRange()
        for leaf in session.scalars(text("SELECT leaf_hash FROM audit_leaves ORDER BY seq")):
            tree.append(bytes(leaf))
        audit_resume.report_row(
            session, audit_verify.LogReport(True, 0, tree.size, tree.root(), frontier=list(tree.hashes))
        )
    return tree.size


def test_a_good_result_a_login_inserts_moves_no_check_past_what_it_has_not_walked(roles_db) -> None:  # type: ignore[no-untyped-def]
    from worker.sealing import check

    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    incremental = runtime.model_copy(update={"audit_rewalk_seconds": 0})  # the incremental part alone
    ids = record_and_seal(runtime, keys, 3)
    assert check(incremental, keys).ok
    ids += record_and_seal(runtime, keys, 3)  # sealed and signed, not checked yet
    # the owner edits one of them and keeps its stored leaf; a "good" result says the log was checked to its end
    with unguarded(owner, "audit_events") as connection:
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": ids[4]})
    assert _forge_a_good_result(runtime) == 6
    report = check(incremental, keys)  # resumed where it stopped (3), not at the forged end
    assert not report.ok and (report.first_bad_seq, report.first_bad_event_id) == (4, ids[4]), report
    _forge_a_good_result(runtime)  # after the failure, to clear it
    again = check(incremental, keys)
    assert not again.ok and again.first_bad_event_id == ids[4], again
    with session_scope(runtime) as session:  # the next resumes where it stopped before the failure
        place = audit_resume.resume_point(session, runtime.audit_witness_file)
    assert place is not None and place.size == 3


def test_a_failure_one_worker_pod_found_is_walked_over_again_by_every_pod(roles_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # each pod keeps its own file beside its own witness file: another pod's file, past the failed
    # position, must not let the check pass there (the verdict flipped with the pod that ran it)
    from worker.sealing import check

    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    ids = record_and_seal(runtime, keys, 4)
    pod_a = runtime.model_copy(update={"audit_rewalk_seconds": 0})
    pod_b = pod_a.model_copy(update={"audit_witness_file": tmp_path / "b" / "witness.log"})
    with session_scope(runtime) as session:  # a new pod, no file yet: the stored results' place
        assert audit_resume.resume_point(session, pod_b.audit_witness_file) is None  # (none stored yet)
    assert check(pod_a, keys).ok
    with session_scope(runtime) as session:
        fresh = audit_resume.resume_point(session, pod_b.audit_witness_file)
    assert fresh is not None and fresh.size == 4  # not the whole log again after each rollout
    assert check(pod_b, keys).ok  # both pods' files at 4
    with unguarded(owner, "audit_events") as connection:
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": ids[1]})
    found = check(runtime, keys)  # pod A's re-walk finds it
    assert not found.ok and found.first_bad_event_id == ids[1], found
    again = check(pod_b, keys)  # pod B, its file at 4, walks over position 1 again
    assert not again.ok and again.first_bad_event_id == ids[1], again
