"""The whole log's check reads its signed checkpoints as its walk reaches them (core.audit_roots).

The sealer signs a checkpoint about every second while events come in: a year's log has tens of
millions, and ``dermq audit verify`` held every one in memory (about 1.4 KB each). On the insider's
database of tests/core/conftest.py, with the witness file the sealer appends to: the stream gives the
walk the roots loading all of them gave, holds a bounded number at a time, and fails the check on a
witness note it can no longer compare."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from core import audit_roots, audit_verify, checkpoint, witness
from core.config import Settings
from core.db import session_scope
from tests.core.audit_roles import record_and_seal, unguarded

EVENTS = audit_roots.LOOKAHEAD + 8  # each sealed alone: a checkpoint at every size, each witnessed


def test_the_stream_gives_the_roots_loading_them_all_gave_and_holds_a_few_at_a_time(  # type: ignore[no-untyped-def]
    roles_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = roles_db["runtime"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, EVENTS)
    page, lookahead = 4, 8  # smaller than the log, to see that they bound what the stream holds
    monkeypatch.setattr(audit_roots, "LOOKAHEAD", lookahead)
    checked: list[str] = []

    def parse(note: str, verifiers: list[checkpoint.Verifier]) -> checkpoint.Checkpoint:
        checked.append(note)
        return checkpoint.parse(note, verifiers)

    monkeypatch.setattr(audit_roots, "parse", parse)
    with session_scope(runtime) as session:
        stored = {size: root for size, root in session.execute(text("SELECT size, root FROM audit_checkpoints"))}
        stream = audit_roots.RootStream(session, keys.verifiers, runtime.audit_witness_file, page=page)
        streamed, held = {}, []
        for size in range(1, EVENTS + 1):
            if (roots := stream.get(size)) is not None:
                streamed[size] = roots
            held.append(len(stream._roots))  # what the stream keeps besides the roots it gave
        assert stream.highest() == EVENTS
    assert stream.problem is None
    # every size's signed root (the witness file's copy of a stored note adds nothing, and is not read twice)
    assert streamed == {size: [bytes(root)] for size, root in stored.items()}
    assert len(streamed) == EVENTS
    assert len(checked) == EVENTS  # each signature checked once: the witness file's copies are the stored notes
    assert max(held) <= 2 * page + 3 * lookahead < EVENTS


def _move_note(path: Path, size: int, places: int) -> None:
    notes = witness.read_notes(path.read_text())
    at = next(i for i, note in enumerate(notes) if witness.note_size(note) == size)
    moved = notes.pop(at)
    notes.insert(at + places, moved)
    path.write_text("".join(note + "\n" for note in notes))


def _stored_checkpoint_gone(owner: Settings, size: int) -> None:
    with unguarded(owner, "audit_checkpoints") as connection:
        connection.execute(text("DELETE FROM audit_checkpoints WHERE size = :size"), {"size": size})


def test_a_witness_note_a_few_notes_late_is_given_to_the_walk_at_its_size(roles_db) -> None:  # type: ignore[no-untyped-def]
    # sealers that run at once (a worker's two children) append in the order they finish
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, EVENTS)
    path = runtime.audit_witness_file
    note = next(n for n in witness.read_notes(path.read_text()) if witness.note_size(n) == 2)
    _stored_checkpoint_gone(owner, 2)  # only the witness file has it now
    _move_note(path, 2, witness.SLACK)
    with session_scope(runtime) as session:
        stream = audit_roots.RootStream(session, keys.verifiers, path)
        assert stream.get(1) is not None
        assert stream.get(2) == [checkpoint.parse(note, keys.verifiers).root]
        report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=path)
    assert report.ok and report.size == EVENTS, report


@pytest.mark.parametrize("stored", [True, False], ids=["its-stored-checkpoint-kept", "its-stored-checkpoint-gone"])
def test_a_witness_note_later_than_the_look_ahead_is_held_to_the_stored_checkpoint_of_its_size(  # type: ignore[no-untyped-def]
    roles_db, stored: bool
) -> None:
    # a sealer held up between its commit and its append while the others sealed on
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, EVENTS)
    if not stored:
        _stored_checkpoint_gone(owner, 2)
    _move_note(runtime.audit_witness_file, 2, audit_roots.LOOKAHEAD + 4)
    with session_scope(runtime) as session:
        report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=runtime.audit_witness_file)
    if stored:
        assert report.ok and report.size == EVENTS, report
    else:
        assert not report.ok
        assert "checkpoint of size 2 comes after checkpoints of more than" in (report.reason or ""), report


def test_checkpoints_sealed_while_a_check_runs_are_left_for_the_next(roles_db) -> None:  # type: ignore[no-untyped-def]
    # a long `dermq audit verify` of a live log: its walk's cursor sees the log as it was at the start
    runtime = roles_db["runtime"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, 3)
    with session_scope(runtime) as session:
        stream = audit_roots.RootStream(session, keys.verifiers, runtime.audit_witness_file, page=2)
        record_and_seal(runtime, keys, 2)  # committed and witnessed after the check began
        assert all(stream.get(size) is not None for size in (1, 2, 3))
        assert stream.highest() == 3 and stream.problem is None


def test_a_problem_found_before_a_deadline_stopped_the_walk_is_a_verdict(roles_db) -> None:  # type: ignore[no-untyped-def]
    # a partial report is where the next check resumes, and is not shown to auditors: a failure must be
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    keys = checkpoint.load_signing_keys(runtime)
    record_and_seal(runtime, keys, 4)
    with unguarded(owner, "audit_checkpoints") as connection:  # its signature no longer verifies
        connection.execute(text("UPDATE audit_checkpoints SET note = replace(note, 'time', 'tame') WHERE size = 3"))
    with session_scope(runtime) as session:
        report = audit_verify.verify_log(
            session, verifiers=keys.verifiers, witness=runtime.audit_witness_file, deadline=time.monotonic()
        )
    assert not report.ok and report.complete, report
    assert "checkpoint of size 3 has no valid signature" in (report.reason or "")
