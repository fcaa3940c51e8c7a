"""The audit trail against the insider it exists for: a database login that owns the tables.

On a database of its own, with an owner role (migrations) and a runtime role (services) as in
production: the runtime role cannot change or disable anything; the owner can rewrite the rows and
every stored hash, but not the signed checkpoints an auditor pinned or the witness file, so
`dermq audit verify --against` fails and names where. Also: rows written before the Merkle log
keep their hash chain and are sealed first, in their chain order.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from cli.db import alembic_config
from core import audit, audit_log, audit_resume, audit_verify, checkpoint, db_roles, merkle
from core.checkpoint import Checkpoint
from core.config import Settings
from core.db import dispose_engines, session_scope
from tests import support
from tests.core.audit_roles import record_and_seal, unguarded


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET detail = '{}'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events CASCADE",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "UPDATE audit_leaves SET leaf_hash = '\\x00'",
        "DELETE FROM audit_checkpoints",
        "INSERT INTO alembic_version VALUES ('x')",
    ],
)
def test_the_runtime_role_cannot_rewrite_or_disable(roles_db, settings: Settings, statement: str) -> None:  # type: ignore[no-untyped-def]
    keys = checkpoint.load_signing_keys(settings)
    record_and_seal(roles_db["runtime"], keys, 1)  # the runtime role can write and seal
    engine = create_engine(roles_db["runtime"].database_url)
    try:
        with pytest.raises(DBAPIError, match=r"permission denied|must be owner"), engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def test_startup_check_refuses_owner_and_superuser_logins(roles_db) -> None:  # type: ignore[no-untyped-def]
    for login, refused in (("runtime", None), ("owner", "owns the audit table"), ("superuser", "superuser")):
        production = roles_db[login].model_copy(update={"environment": "production"})
        engine = create_engine(production.database_url)
        try:
            with engine.connect() as connection:
                if refused is None:
                    db_roles.check_login(connection, production)
                else:
                    with pytest.raises(db_roles.InsecureLoginError, match=refused):
                        db_roles.check_login(connection, production)
                    db_roles.check_login(connection, roles_db[login])  # development: allowed
        finally:
            engine.dispose()


def test_the_api_refuses_to_start_as_the_owner_in_production(roles_db) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    production = roles_db["owner"].model_copy(update={"environment": "production"})
    with pytest.raises(db_roles.InsecureLoginError, match="refusing to start"), TestClient(create_app(production)):
        pass
    runtime = roles_db["runtime"].model_copy(update={"environment": "production"})
    with TestClient(create_app(runtime)) as client:
        assert client.get("/healthz").status_code == 200


def test_insider_rewrite_fails_against_a_pinned_checkpoint(roles_db, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    ids = record_and_seal(runtime, keys, 4)
    pinned = tmp_path / "pinned.checkpoint"
    with session_scope(runtime) as session:
        latest = audit_log.latest_checkpoint(session)
        assert latest is not None and latest.size == 4
        pinned.write_text(latest.note)  # the auditor keeps this
    ids += record_and_seal(runtime, keys, 2)

    # The owner's attack: disable the triggers, delete the oldest event, edit another, and rebuild every
    # stored hash from the doctored rows (re-sealed with a key of its own: it cannot read the real one).
    with unguarded(owner, "audit_events", "audit_leaves", "audit_nodes", "audit_checkpoints") as connection:
        connection.execute(text("DELETE FROM audit_leaves"))
        connection.execute(text("DELETE FROM audit_nodes"))
        connection.execute(text("DELETE FROM audit_checkpoints"))
        connection.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[0]})
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": ids[2]})
    forger = checkpoint.generate(owner.audit_log_origin)
    with session_scope(owner) as session:
        assert audit_log.seal(session, forger, owner.audit_log_origin) is not None
    with session_scope(owner) as session:  # the stored log is consistent with itself again...
        assert audit_verify.verify_log(session, verifiers=None).ok
        # ...but not with the signed checkpoints: the pinned one and the witness file's
        witness = owner.audit_witness_file
        _, report = audit_verify.verify_against(session, pinned.read_text(), keys.verifiers, witness=witness)
    assert not report.ok and report.first_bad_seq == 0, report
    assert "no longer match the signed checkpoint of size 1" in (report.reason or "")

    env = {
        **os.environ,
        "DERMQ_DATABASE_URL": owner.database_url,
        "DERMQ_KEY_FILE": str(settings.key_file),
        "DERMQ_AUDIT_WITNESS_FILE": str(owner.audit_witness_file),
        "DERMQ_ENVIRONMENT": "test",
    }
    cli = subprocess.run(
        [*support.DERMQ, "audit", "verify", "--against", str(pinned)],
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 1 and "AUDIT LOG BROKEN at position 0" in cli.stdout, cli.stdout + cli.stderr
    # Without the witness file the pinned checkpoint alone still fails the log (at its own range).
    cli = subprocess.run(
        [*support.DERMQ, "audit", "verify", "--against", str(pinned)],
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        env={**env, "DERMQ_AUDIT_WITNESS_FILE": str(tmp_path / "none.log")},
    )
    assert cli.returncode == 1 and "signed checkpoint of size 4" in cli.stdout, cli.stdout


def test_a_rewrite_only_a_long_witness_file_proves_fails_the_periodic_check_and_the_full_one_names_it(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings, tmp_path: Path
) -> None:
    from worker.sealing import check

    keys = checkpoint.load_signing_keys(settings)
    # a long file: notes of small trees that nobody here trusts (another log's key)
    stranger = checkpoint.generate("elsewhere.example/audit")
    path = tmp_path / "witness.log"
    signed = datetime.now(UTC)
    path.write_text(
        "".join(
            Checkpoint(stranger.signer.name, n % 3, merkle.leaf_hash(b"x"), signed).sign(stranger.signer) + "\n"
            for n in range(20_000)
        )
    )
    runtime, owner = (roles_db[role].model_copy(update={"audit_witness_file": path}) for role in ("runtime", "owner"))
    record_and_seal(runtime, keys, 3)
    assert check(runtime, keys).ok  # the next check resumes at 3 events
    ids = record_and_seal(runtime, keys, 2)  # witnessed at the end of the file, at 4 and 5 events
    # The owner rewrites the newest event, its stored leaf, and deletes the stored checkpoints past 3:
    # only the witness file's last notes still prove what the log held.
    with unguarded(owner, "audit_events", "audit_leaves", "audit_checkpoints") as connection:
        connection.execute(text("DELETE FROM audit_checkpoints WHERE size > 3"))
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 99}' WHERE id = :id"), {"id": ids[1]})
        row = connection.execute(
            text(f"SELECT {audit.LEAF_COLUMNS_SQL} FROM audit_events e WHERE e.id = :id"), {"id": ids[1]}
        ).one()
        connection.execute(
            text("UPDATE audit_leaves SET leaf_hash = :leaf WHERE event_id = :id"),
            {"id": ids[1], "leaf": merkle.leaf_hash(audit.leaf_bytes_from_columns(row))},
        )
    with session_scope(owner) as session:  # without the witness file nothing tells the rewrite apart
        start = audit_resume.resume_point(session)
        assert start is not None and start.size == 3
        assert audit_verify.verify_log(session, verifiers=keys.verifiers, start=start).ok
    report = check(runtime, keys)  # the stored tree no longer has the witnessed roots at 4 and 5
    assert not report.ok and "not those of the witness file's checkpoint" in (report.reason or ""), report
    with session_scope(owner) as session:  # the full verification names the event
        full = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=path)
    assert not full.ok and (full.first_bad_seq, full.first_bad_event_id) == (4, ids[1]), full


def test_a_log_rewound_and_sealed_again_fails_the_check_even_from_a_resume_point_at_its_new_checkpoints(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings, tmp_path: Path
) -> None:
    from worker.sealing import check

    keys = checkpoint.load_signing_keys(settings)
    path = tmp_path / "witness.log"
    runtime, owner = (roles_db[role].model_copy(update={"audit_witness_file": path}) for role in ("runtime", "owner"))
    ids = record_and_seal(runtime, keys, 6)
    assert check(runtime, keys).ok
    # The owner rewinds the log to 2 events (the rest of its events, leaves, nodes and checkpoints
    # deleted) and lets the sealer go on: new checkpoints, signed with the real key, of a new history.
    with unguarded(owner, "audit_events", "audit_leaves", "audit_nodes", "audit_checkpoints") as connection:
        connection.execute(text("DELETE FROM audit_leaves WHERE seq >= 2"))
        connection.execute(text("DELETE FROM audit_nodes WHERE (idx + 1) * (1 << level) > 2"))
        connection.execute(text("DELETE FROM audit_checkpoints WHERE size > 2"))
        connection.execute(text("DELETE FROM audit_events WHERE id = ANY(:ids)"), {"ids": ids[2:]})
    record_and_seal(runtime, keys, 30)  # 32 events: a new checkpoint at each size from 3
    with session_scope(owner) as session:  # and a "good" check at the new tree's end, which it vouches for
        rewound = audit_verify.verify_log(session, verifiers=None)
        assert rewound.ok and rewound.size == 32
        audit_resume.report_row(session, rewound)
    report = check(runtime, keys)
    assert not report.ok and "rewound" in (report.reason or ""), report
    again = check(runtime, keys)  # and every check after it, until an operator has looked
    assert not again.ok and again.reason == report.reason
    with session_scope(owner) as session:  # the auditors' full verification names where the histories part
        full = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=path)
    assert not full.ok and full.first_bad_seq == 2, full


def test_an_edit_that_leaves_the_stored_leaf_is_named_exactly(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    keys = checkpoint.load_signing_keys(settings)
    ids = record_and_seal(roles_db["runtime"], keys, 5)
    with unguarded(roles_db["owner"], "audit_events") as connection:
        connection.execute(text("UPDATE audit_events SET action = 'case.list' WHERE id = :id"), {"id": ids[1]})
        connection.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE id = :id"), {"id": ids[3]})
    witness = roles_db["owner"].audit_witness_file
    with session_scope(roles_db["owner"]) as session:
        report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=witness)
        every = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=witness, every=True)
    assert not report.ok and (report.first_bad_seq, report.first_bad_event_id) == (1, ids[1])
    assert "altered" in (report.reason or "")
    # past the first break: both edits, and nothing else (the stored leaves still match every checkpoint)
    assert [(p, e) for p, e, _ in every.problems] == [(1, ids[1]), (3, ids[3])]
    assert every.checkpoints == 5 and every.checked == 5


@pytest.mark.parametrize("moved", ["same date BC", "infinity"])
def test_an_event_moved_out_of_the_years_python_can_hold_is_named(roles_db, settings: Settings, moved: str) -> None:  # type: ignore[no-untyped-def]
    # Postgres prints a year BC without its sign: moved back to the same date BC, an event dropped out
    # of every export and time-bounded search while its leaf, and so every verification, stayed the same.
    keys = checkpoint.load_signing_keys(settings)
    ids = record_and_seal(roles_db["runtime"], keys, 3)
    years = "make_interval(years => 2 * extract(year FROM occurred_at)::int - 1)"
    value = f"occurred_at - {years}" if moved == "same date BC" else "'infinity'"
    printed = "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
    with unguarded(roles_db["owner"], "audit_events") as connection:
        before = connection.scalar(text(f"SELECT {printed} FROM audit_events WHERE id = :id"), {"id": ids[1]})
        connection.execute(text(f"UPDATE audit_events SET occurred_at = {value} WHERE id = :id"), {"id": ids[1]})
        after = connection.scalar(text(f"SELECT {printed} FROM audit_events WHERE id = :id"), {"id": ids[1]})
    assert after == (before if moved == "same date BC" else None)  # what the leaf was built from, unsigned
    with session_scope(roles_db["owner"]) as session:
        report = audit_verify.verify_log(session, verifiers=keys.verifiers)
    assert not report.ok and (report.first_bad_seq, report.first_bad_event_id) == (1, ids[1]), report


def test_events_a_leaf_inserted_out_of_turn_made_the_log_skip_are_named(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    # The services' login may insert leaves (the sealer runs as it). A leaf for the newest event, put
    # at the next position, moves the sealer past the events before it: they would never be sealed.
    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 2)
    with session_scope(runtime) as session:  # the workers' check so far: its next run starts from here
        audit_resume.report_row(session, audit_verify.verify_log(session, verifiers=keys.verifiers))
    skipped = []
    for i in range(3):
        with session_scope(runtime) as session:
            skipped.append(
                audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM, detail={"i": i})
            )
    newest = skipped.pop()
    with session_scope(runtime) as session:
        row = session.execute(
            text(f"SELECT {audit.LEAF_COLUMNS_SQL} FROM audit_events e WHERE e.id = :id"), {"id": newest}
        ).one()
        leaf = merkle.leaf_hash(audit.leaf_bytes_from_columns(row))
        session.execute(
            text("INSERT INTO audit_leaves (seq, event_id, leaf_hash) VALUES (2, :id, :leaf)"),
            {"id": newest, "leaf": leaf},
        )
    audit_log.seal_once(runtime, keys)  # the sealer goes on from the inserted leaf
    witness = runtime.audit_witness_file

    def both_checks() -> tuple[audit_verify.LogReport, audit_verify.LogReport] | None:
        """The whole check and the incremental one, once both name every skipped event: an event
        counts as committed only below the cluster's oldest running transaction (pg_snapshot_xmin),
        which another database's transaction (a parallel test's) may hold back a while, releasing
        the skipped events one at a time (a CI run once saw the first named and not yet the second)."""
        with session_scope(roles_db["owner"]) as session:
            assert session.scalar(text("SELECT count(*) FROM audit_leaves")) == 3
            report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=witness)
            start = audit_resume.resume_point(session)
            assert start is not None and start.size == 2
            incremental = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=witness, start=start)
        named = all(not r.ok and [e for _, e, _ in r.problems] == skipped for r in (report, incremental))
        return (report, incremental) if named else None

    found_by = support.wait_for(both_checks, timeout=60, what="both checks to name the skipped events")
    for found in found_by:
        assert not found.ok and found.first_bad_event_id == skipped[0], found
        assert [e for _, e, _ in found.problems] == skipped and "skipped by the log" in (found.reason or "")


def test_a_leaf_outside_the_log_is_refused_and_its_event_named_as_skipped(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    # A leaf at a negative position, naming a new event, kept the sealer from ever sealing it while
    # every look by position passed over it: the services' login may no longer put one there, and an
    # owner who drops the constraint and does gets the event named by the check
    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    record_and_seal(runtime, keys, 2)
    with session_scope(runtime) as session:
        hidden = audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM, detail={})
    stray = text("INSERT INTO audit_leaves (seq, event_id, leaf_hash) VALUES (-1, :id, '\\x00')")
    engine = create_engine(runtime.database_url)
    try:
        with pytest.raises(DBAPIError, match="ck_audit_leaves_position"), engine.begin() as connection:
            connection.execute(stray, {"id": hidden})
    finally:
        engine.dispose()
    with unguarded(owner) as connection:
        connection.execute(text("ALTER TABLE audit_leaves DROP CONSTRAINT ck_audit_leaves_position"))
        connection.execute(stray, {"id": hidden})
    with session_scope(runtime) as session:
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM, detail={})

    def sealed() -> audit_log.SealResult | None:  # the sealer passes over the hidden event, to the next
        result = audit_log.seal_once(runtime, keys)
        return result if result is not None and result.size == 3 else None

    support.wait_for(sealed, timeout=60, what="the sealer to seal the event after the hidden one")
    with session_scope(owner) as session:
        assert session.scalar(text("SELECT count(*) FROM audit_leaves WHERE seq >= 0")) == 3
        with pytest.raises(LookupError):  # no proof of a position outside the log (it answered 500)
            audit_log.inclusion_proof(session, hidden, 3)

    def named() -> audit_verify.LogReport | None:
        with session_scope(owner) as session:
            report = audit_verify.verify_log(session, verifiers=keys.verifiers)
        return report if report.problems else None  # (committed below the cluster's oldest transaction)

    report = support.wait_for(named, timeout=60, what="the check to name the hidden event")
    assert not report.ok and [e for _, e, _ in report.problems] == [hidden], report


def test_rows_from_before_the_log_keep_their_chain_and_are_sealed_first(settings: Settings) -> None:
    from core.audit_chain import GENESIS, chain_hash, verify_chain
    from core.models import AuditEvent

    url = make_url(settings.database_url).set(database=f"{support.TEST_DATABASE}_legacy").render_as_string(False)
    support.recreate_database(url)
    try:
        command.upgrade(alembic_config(url), "0004")
        legacy = settings.model_copy(update={"database_url": url, "audit_witness_file": None})
        engine = create_engine(url)
        prev, ids = GENESIS, []
        with session_scope(legacy) as session:
            for i in range(5):  # what the old core.audit.record wrote
                event = AuditEvent(
                    id=100 + i,
                    occurred_at=datetime.now(UTC),
                    action="case.read",
                    outcome="success",
                    actor_type="system",
                    detail={"i": i},
                )
                event.prev_hash = prev
                event.hash = prev = chain_hash(prev, event)
                session.add(event)
                ids.append(event.id)
        command.upgrade(alembic_config(url), "head")
        with session_scope(legacy) as session:
            audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
        support.seal_all(legacy)
        with session_scope(legacy) as session:
            assert verify_chain(session).ok and verify_chain(session).checked == 5
            order = session.scalars(text("SELECT event_id FROM audit_leaves ORDER BY seq")).all()
            assert order[:5] == ids and len(order) == 6
            assert audit_verify.verify_log(session, verifiers=checkpoint.load_signing_keys(settings).verifiers).ok
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            connection.execute(text("UPDATE audit_events SET detail = '{}' WHERE id = 102"))
        engine.dispose()
        with session_scope(legacy) as session:
            report = audit_verify.verify_log(session, verifiers=None)
        assert not report.ok and report.first_bad_event_id == 102
    finally:
        dispose_engines()
        support.drop_database(url)


def test_downgrade_keeps_an_empty_log_and_refuses_to_drop_a_used_one(settings: Settings) -> None:
    url = make_url(settings.database_url).set(database=f"{support.TEST_DATABASE}_mig").render_as_string(False)
    support.recreate_database(url)
    try:
        command.upgrade(alembic_config(url), "head")
        command.downgrade(alembic_config(url), "0004")  # nothing written yet: a clean way back
        command.upgrade(alembic_config(url), "head")
        with session_scope(settings.model_copy(update={"database_url": url})) as session:
            audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
        with pytest.raises(RuntimeError, match="refuses to drop the log"):
            command.downgrade(alembic_config(url), "0004")
    finally:
        dispose_engines()
        support.drop_database(url)
