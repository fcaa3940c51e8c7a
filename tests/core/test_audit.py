"""core.audit and the sealer against the real Postgres: lock-free appends, sealed once each in one order
into a Merkle log whose signed checkpoints and proofs verify, and whose tampering `verify` pinpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from core import audit, audit_commands, audit_log, audit_verify, checkpoint, merkle
from core.db import session_scope
from core.errors import KeyringError
from tests import support
from tests.support import ROOT


def _record(settings, n: int = 1, **detail: object) -> list[int]:  # type: ignore[no-untyped-def]
    ids = []
    with session_scope(settings) as session:
        for i in range(n):
            event_id = audit.record(
                session,
                action="test.event",
                outcome=audit.SUCCESS,
                actor=audit.SYSTEM,
                entity_type="test",
                entity_id=str(uuid.uuid4()),
                detail={"i": i, **detail},
            )
            ids.append(event_id)
    return ids


@pytest.fixture
def keys(settings):  # type: ignore[no-untyped-def]
    return checkpoint.load_signing_keys(settings)


def _seal(settings, keys, ids: list[int] | None = None) -> audit_log.SealResult:  # type: ignore[no-untyped-def]
    """Seal until ``ids`` are in the log. The sealer waits for every transaction older than theirs, in the
    whole cluster (other test runs share it), so one run may seal nothing yet."""
    deadline = time.monotonic() + 60
    while True:
        result = audit_log.seal_once(settings, keys)
        if result is not None and (not ids or len(_positions(settings, ids)) == len(ids)):
            return result
        assert time.monotonic() < deadline, "the sealer did not seal the events within 60 s"
        time.sleep(0.1)


def _positions(settings, ids: list[int]) -> dict[int, int]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        rows = session.execute(
            text("SELECT event_id, seq FROM audit_leaves WHERE event_id = ANY(:ids)"), {"ids": ids}
        ).all()
    return {r.event_id: r.seq for r in rows}


def test_events_are_sealed_in_order_and_proven(settings, database, keys) -> None:  # type: ignore[no-untyped-def]
    ids = _record(settings, 3, note="ünïcode ok")
    sealed = _seal(settings, keys, ids)
    positions = _positions(settings, ids)
    assert [positions[i] for i in ids] == list(range(positions[ids[0]], positions[ids[0]] + 3))
    parsed = checkpoint.parse(sealed.note or "", keys.verifiers)
    assert (parsed.size, parsed.root) == (sealed.size, sealed.root)
    assert sealed.note in (settings.audit_witness_file.read_text())  # witnessed outside Postgres
    with session_scope(settings) as session:
        for event_id in ids:
            index, leaf, proof = audit_log.inclusion_proof(session, event_id, sealed.size)
            event = session.get(audit.AuditEvent, event_id)
            assert leaf == merkle.leaf_hash(audit.leaf_bytes(event))
            assert merkle.verify_inclusion(leaf, index, sealed.size, proof, parsed.root)
        assert audit_verify.verify_log(session, verifiers=keys.verifiers).ok
    again = _seal(settings, keys)
    assert again.sealed == 0 and again.size == sealed.size  # nothing is sealed twice


def test_a_later_commit_of_an_earlier_transaction_is_sealed_not_skipped(settings, database, keys) -> None:  # type: ignore[no-untyped-def]
    """A transaction that began (and got its id) first but commits last: writers never wait for it,
    the sealer holds back until it ends, and then seals its event after the others."""
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as slow:
            transaction = slow.begin()
            slow_id = slow.scalar(
                text(
                    "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, detail) "
                    "VALUES (now(), 'test.slow', 'success', 'system', '{}') RETURNING id"
                )
            )
            fast = _record(settings, 2)  # would have waited for the chain lock before: no lock any more
            result = _seal(settings, keys)
            sealed_so_far = _positions(settings, [*fast, slow_id])
            assert slow_id not in sealed_so_far and not any(i in sealed_so_far for i in fast)
            transaction.commit()
        _seal(settings, keys, [*fast, slow_id])
        positions = _positions(settings, [*fast, slow_id])
        assert positions[slow_id] < positions[fast[0]] < positions[fast[1]]  # (txid, id): the slow one began first
        assert min(positions.values()) >= result.size
    finally:
        engine.dispose()
    with session_scope(settings) as session:
        assert audit_verify.verify_log(session, verifiers=keys.verifiers).ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET action = 'edited' WHERE id = (SELECT max(id) FROM audit_events)",
        "DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)",
        "TRUNCATE audit_events CASCADE",
        "UPDATE audit_leaves SET leaf_hash = '\\x00' WHERE seq = 0",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_nodes",
    ],
)
def test_the_database_refuses_changes(settings, database, keys, statement: str) -> None:  # type: ignore[no-untyped-def]
    _seal(settings, keys, _record(settings))
    with pytest.raises(DBAPIError, match="append-only"), session_scope(settings) as session:
        session.execute(text(statement))


def test_concurrent_writers_are_each_sealed_once(settings, database, keys) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    written: list[int] = []

    def write() -> None:
        try:
            for _ in range(5):
                written.extend(_record(settings, 2))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    sealers = [threading.Thread(target=lambda: audit_log.seal_once(settings, keys)) for _ in range(3)]
    for sealer in sealers:  # concurrent sealers: the lock lets one write, the others return
        sealer.start()
    for thread in threads + sealers:
        thread.join()
    assert not errors
    _seal(settings, keys, written)
    positions = _positions(settings, written)
    assert len(positions) == len(written) == 60 and len(set(positions.values())) == 60
    with session_scope(settings) as session:
        assert audit_verify.verify_log(session, verifiers=keys.verifiers).ok


def test_an_edit_is_found_and_named(settings, database, keys) -> None:  # type: ignore[no-untyped-def]
    ids = _record(settings, 3)
    _seal(settings, keys, ids)
    target = ids[1]
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": target})
            connection.execute(text("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only"))
        with session_scope(settings) as session:
            report = audit_verify.verify_log(session, verifiers=keys.verifiers)
        assert not report.ok and report.first_bad_event_id == target and "altered" in (report.reason or "")
        cli = subprocess.run(
            [sys.executable, "-m", "cli", "audit", "verify"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=_env(settings),
        )
        assert cli.returncode == 1 and f"(event {target})" in cli.stdout, cli.stdout + cli.stderr
    finally:
        with engine.begin() as connection:  # restore the row so later tests see an intact log
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 1}' WHERE id = :id"), {"id": target})
            connection.execute(text("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only"))
        engine.dispose()
    with session_scope(settings) as session:
        assert audit_verify.verify_log(session, verifiers=keys.verifiers).ok


def test_cli_prints_the_checkpoint_and_verifies_against_it(settings, database, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _seal(settings, keys, _record(settings, 2))
    shown = _dermq(settings, "audit", "checkpoint", "--json")
    assert shown.returncode == 0, shown.stderr
    latest = json.loads(shown.stdout)
    pinned = tmp_path / "pinned.checkpoint"
    pinned.write_text(latest["checkpoint"])
    assert (
        checkpoint.parse(latest["checkpoint"], [checkpoint.Verifier.decode(latest["verifier_key"])]).size
        == latest["size"]
    )
    _seal(settings, keys, _record(settings, 2))
    verified = _dermq(settings, "audit", "verify", "--against", str(pinned), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    answer = json.loads(verified.stdout)
    assert answer["ok"] and answer["pinned_size"] == latest["size"] < answer["size"]
    # what `dermq audit checkpoint --json` printed pins as well, and a byte-order mark changes nothing
    for pinned_form in (shown.stdout.encode(), b"\xef\xbb\xbf" + latest["checkpoint"].encode()):
        pinned.write_bytes(pinned_form)
        again = _dermq(settings, "audit", "verify", "--against", str(pinned))
        assert again.returncode == 0, again.stdout + again.stderr
    forged = tmp_path / "forged.checkpoint"
    forged.write_text(latest["checkpoint"].replace(f"\n{latest['size']}\n", f"\n{latest['size'] + 1}\n"))
    rejected = _dermq(settings, "audit", "verify", "--against", str(forged))
    assert rejected.returncode == 1 and "REJECTED" in rejected.stdout
    # the wrong file is a mistake to correct (exit 2), not a broken log (1), and never a traceback
    nested = b'{"a":' + b"[" * 50_000  # JSON too deep for the parser
    for garbage in (b"\xff\xfe\x00binary", b"not a checkpoint\n", b'{"size": 3}', nested, b"x" * (65 * 1024)):
        forged.write_bytes(garbage)
        unreadable = _dermq(settings, "audit", "verify", "--against", str(forged))
        assert unreadable.returncode == 2, unreadable.stdout + unreadable.stderr
        assert unreadable.stderr.startswith("error: the --against file") and "Traceback" not in unreadable.stderr


def test_an_auditor_verifies_with_the_verifier_key_alone(settings, database, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _seal(settings, keys, _record(settings, 2))
    verifier = keys.signer.verifier.encode()
    # where the auditor runs it there is no signing key (only the sealer's hosts hold one)
    auditor = {**_env(settings), "DERMQ_AUDIT_SIGNING_KEY_FILE": str(tmp_path / "not-here.json")}

    def dermq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*support.DERMQ, "audit", *args], cwd=ROOT, capture_output=True, text=True, env=auditor)

    assert dermq("verify").returncode == 2  # no signing key and no verifier key: nothing to check with
    with pytest.raises(KeyringError, match="no audit signing key"):
        audit_commands.verify(settings.model_copy(update={"audit_signing_key_file": tmp_path / "not-here.json"}))
    shown = dermq("checkpoint", "--verifier", verifier, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["verifier_key"] == verifier, shown.stderr
    pinned = tmp_path / "pinned.checkpoint"
    pinned.write_text(json.loads(shown.stdout)["checkpoint"])
    verified = dermq("verify", "--verifier", verifier, "--against", str(pinned), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stdout + verified.stderr
    # a key that signed nothing here verifies nothing
    stranger = checkpoint.generate(settings.audit_log_origin).signer.verifier.encode()
    assert dermq("checkpoint", "--verifier", stranger).returncode == 1
    with pytest.raises(checkpoint.CheckpointError):
        audit_commands.latest_checkpoint(settings, [checkpoint.Verifier.decode(stranger)])
    assert dermq("verify", "--verifier", stranger).returncode == 1
    assert dermq("verify", "--verifier", "not a key").returncode == 2


def _env(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {
        **os.environ,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_KEY_FILE": str(settings.key_file),
        "DERMQ_AUDIT_WITNESS_FILE": str(settings.audit_witness_file),
        "DERMQ_ENVIRONMENT": "test",
    }


def _dermq(settings, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """``dermq *args`` run as an operator would, on ``settings``' database and keys."""
    return subprocess.run([*support.DERMQ, *args], cwd=ROOT, capture_output=True, text=True, env=_env(settings))


def test_cli_actions_record_the_os_user_and_host(settings, database) -> None:  # type: ignore[no-untyped-def]
    import getpass
    import socket

    name = f"cli-clinic-{uuid.uuid4().hex[:8]}"
    done = _dermq(settings, "clinic", "create", name, "--json")
    assert done.returncode == 0, done.stderr
    clinic_id = json.loads(done.stdout)["id"]
    with session_scope(settings) as session:
        row = session.execute(
            text("SELECT actor_type, user_agent FROM audit_events WHERE action = 'clinic.create' AND entity_id = :id"),
            {"id": clinic_id},
        ).one()
    assert row.actor_type == "cli" and row.user_agent == f"dermq-cli {getpass.getuser()}@{socket.gethostname()}"
