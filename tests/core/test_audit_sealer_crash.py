"""16 concurrent writers while the dedicated sealer process is killed with SIGKILL and restarted:
nothing is lost, every event is sealed exactly once in one order, and every proof verifies."""

from __future__ import annotations

import base64
import itertools
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from core import audit, audit_log, audit_verify, checkpoint, merkle
from core import witness as witness_file
from core.config import Settings
from core.db import session_scope
from tests import processes, support

WRITERS = 16


def _checkpoints(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(text("SELECT count(*) FROM audit_checkpoints")) or 0)


def test_sealer_killed_mid_way_loses_nothing(settings: Settings, database, stack_env, stack_dir: Path) -> None:  # type: ignore[no-untyped-def]
    keys = checkpoint.load_signing_keys(settings)
    support.seal_all(settings)  # start from a fully sealed log
    env = {**stack_env, "DERMQ_AUDIT_SEAL_INTERVAL_SECONDS": "0.2"}
    stop = threading.Event()
    written: list[int] = []
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            while not stop.is_set():
                with session_scope(settings) as session:
                    ids = audit.record_many(
                        session,
                        [
                            audit.Event(
                                "case.read", audit.SUCCESS, audit.SYSTEM, "case", uuid.uuid4(), detail={"w": n}
                            ),
                            audit.Event("case.list", audit.SUCCESS, audit.SYSTEM, detail={"w": n}),
                        ],
                    )
                written.extend(ids)
                time.sleep(0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for thread in writers:
        thread.start()
    first = processes.Process("sealer", [sys.executable, "-m", "worker.sealing"], env, stack_dir / "sealer.log")
    try:
        before = _checkpoints(settings)
        support.wait_for(lambda: _checkpoints(settings) >= before + 3, timeout=60, what="the sealer to seal")
        first.stop(signal.SIGKILL)  # mid-way: it seals every 0.2 s while 16 writers keep writing
        killed_at = len(written)
        time.sleep(1.0)
        assert len(written) > killed_at  # writers never wait for the sealer
        second = processes.Process("sealer", [sys.executable, "-m", "worker.sealing"], env, stack_dir / "sealer.log")
        try:
            again = _checkpoints(settings)
            support.wait_for(lambda: _checkpoints(settings) >= again + 3, timeout=60, what="the restarted sealer")
        finally:
            stop.set()
            for thread in writers:
                thread.join()
            second.stop()
    finally:
        stop.set()
        first.stop(signal.SIGKILL)
    assert not errors
    latest = support.seal_all(settings)

    with session_scope(settings) as session:
        rows = session.execute(
            text(
                "SELECT l.seq, l.event_id, e.txid::text AS txid FROM audit_leaves l "
                "JOIN audit_events e ON e.id = l.event_id ORDER BY l.seq"
            )
        ).all()
        events = session.scalar(text("SELECT count(*) FROM audit_events"))
    assert [r.seq for r in rows] == list(range(len(rows))) and len(rows) == events == latest.size
    sealed = {r.event_id for r in rows}
    assert set(written) <= sealed and len(sealed) == len(rows)  # nothing lost, nothing twice
    order = [(int(r.txid), r.event_id) for r in rows]
    assert order == sorted(order)  # one order: by inserting transaction, then id

    witness = settings.audit_witness_file.read_text()  # type: ignore[union-attr]
    notes = [checkpoint.parse(n, keys.verifiers) for n in witness_file.read_notes(witness)]
    assert [n.size for n in notes] == sorted(n.size for n in notes)
    with session_scope(settings) as session:
        report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=settings.audit_witness_file)
        assert report.ok and report.size == latest.size, report
        for old, new in itertools.pairwise(notes):
            proof = audit_log.consistency_proof(session, old.size, new.size)
            assert merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)
        for event_id in written[:: max(1, len(written) // 25)]:
            index, leaf, path = audit_log.inclusion_proof(session, event_id, latest.size)
            assert merkle.verify_inclusion(leaf, index, latest.size, path, latest.root)
        # the signed checkpoint of the whole log names its root (the last run may have had nothing new
        # to seal, and then signed nothing itself: the restarted sealer signed it)
        stored = audit_log.latest_checkpoint(session)
        assert stored is not None and (stored.size, stored.root) == (latest.size, latest.root)
        assert base64.b64encode(latest.root).decode() in stored.note
