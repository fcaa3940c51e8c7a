"""What the services' database login may and may not do to the audit log beyond changing rows: the
events it inserts, the verification results it inserts, and a stalled or tampered log's signs."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from core import audit, audit_log, audit_resume, audit_verify, checkpoint, merkle
from core.config import Settings
from core.db import session_scope
from tests import support
from tests.core.audit_roles import record_and_seal, unguarded

EVENT = (
    "INSERT INTO audit_events (occurred_at, action, outcome, actor_type, detail{extra}) "
    "VALUES (now(), 'x', 'success', 'system', '{{}}'{values})"
)


@pytest.mark.parametrize(
    ("extra", "values", "refused"),
    [
        (", hash, prev_hash", ", repeat('0', 64), repeat('0', 64)", "no chain hash"),
        (", id", ", 9000000000", "id comes from its sequence"),
        ("", "", None),
    ],
    ids=["chain-hash", "id-ahead", "plain"],
)
def test_the_runtime_role_inserts_only_plain_events(roles_db, extra: str, values: str, refused: str | None) -> None:  # type: ignore[no-untyped-def]
    # A chain hash stopped every full verify at the old chain for good; an id ahead of the sequence made
    # later real inserts fail; a transaction id of its own choosing moved the sealer past real events.
    engine = create_engine(roles_db["runtime"].database_url)
    try:
        if refused:
            with pytest.raises(DBAPIError, match=refused), engine.begin() as connection:
                connection.execute(text(EVENT.format(extra=extra, values=values)))
        # the time is the database's clock at the insert, whatever the insert says: an event dated a year
        # ahead or back, BC or -infinity (rows no search or export showed, which the driver could not read
        # back), or minutes off by a drifting host clock
        for said in (
            "'9999-12-31'",
            "'2026-06-01 BC'",
            "'-infinity'",
            "now() - interval '25 hours'",
            "now() + interval '20 minutes'",
        ):
            with engine.begin() as connection:
                before = connection.scalar(text("SELECT clock_timestamp()"))
                inserted = EVENT.format(extra="", values="").replace("VALUES (now()", f"VALUES ({said}")
                event_id = connection.scalar(text(inserted + " RETURNING id"))
                stored = connection.scalar(
                    text("SELECT occurred_at FROM audit_events WHERE id = :id"), {"id": event_id}
                )
                assert before <= stored <= connection.scalar(text("SELECT clock_timestamp()")), said
        with engine.begin() as connection:  # the database sets txid, whatever the insert says
            forged = EVENT.format(extra=", txid", values=", '99999999999'::xid8")
            event_id = connection.scalar(text(forged + " RETURNING id"))
            own = connection.scalar(text("SELECT pg_current_xact_id()::text"))
            assert (
                connection.scalar(text("SELECT txid::text FROM audit_events WHERE id = :id"), {"id": event_id}) == own
            )
    finally:
        engine.dispose()


def test_a_verification_result_the_services_login_inserts_cannot_stay_the_latest(roles_db) -> None:  # type: ignore[no-untyped-def]
    # The latest result is the highest id: a forged "ok" with an id far ahead was shown by the API and
    # the console for good, above every real result, failures included.
    engine = create_engine(roles_db["runtime"].database_url)
    forged = (
        "INSERT INTO audit_verifications ({extra}ok, size, root, checked) VALUES ({values}true, 1, NULL, 1) "
        "RETURNING id, checked_at"
    )
    try:
        with pytest.raises(DBAPIError, match="id comes from its sequence"), engine.begin() as connection:
            connection.execute(text(forged.format(extra="id, ", values="9000000000000000000, ")))
        with engine.begin() as connection:
            dated = forged.format(extra="checked_at, ", values="'2999-01-01', ")
            row = connection.execute(text(dated)).one()
            assert connection.scalar(text("SELECT max(id) FROM audit_verifications")) == row.id
            assert row.checked_at == connection.scalar(text("SELECT now()"))  # the database's time, not the insert's
    finally:
        engine.dispose()


def test_the_sealer_signs_nothing_over_a_tree_rewritten_since_its_last_checkpoint(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    # The owner rewrites stored hashes under the signed checkpoints: the next checkpoint would be a
    # valid signature over the forged tree, and later checks would take it as the truth.
    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    record_and_seal(runtime, keys, 4)
    with unguarded(owner, "audit_nodes") as connection:
        connection.execute(text("UPDATE audit_nodes SET hash = :h WHERE level = 2 AND idx = 0"), {"h": bytes(32)})
    with session_scope(runtime) as session:
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
        before = audit_log.latest_checkpoint(session)
    with pytest.raises(audit_log.TamperedLog, match="no longer hashes to the signed checkpoint of size 4"):
        support.seal_all(runtime)
    with session_scope(runtime) as session:
        assert audit_log.latest_checkpoint(session) == before  # nothing signed
        assert audit_log.unsealed_age(session) is not None  # and the lag shows it (DermqAuditSealingStalled)


def test_the_sealer_signs_nothing_over_a_leaf_inserted_past_its_last_checkpoint(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    # The services' login may insert leaves (the sealer runs as it): one for the newest event moves the
    # sealer's place past the events before it; signing on would vouch for the log that skips them.
    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 2)
    with session_scope(runtime) as session:
        newest = [
            audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM) for _ in range(2)
        ]
        session.execute(
            text("INSERT INTO audit_leaves (seq, event_id, leaf_hash) VALUES (2, :id, :leaf)"),
            {"id": newest[-1], "leaf": bytes(32)},
        )
    with session_scope(runtime) as session:
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
    with pytest.raises(audit_log.TamperedLog, match="the log holds 3 events; its latest signed checkpoint 2"):
        support.seal_all(runtime)


def test_a_resume_point_the_services_login_wrote_counts_only_where_a_checkpoint_vouches_for_it(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings
) -> None:
    # The periodic check resumes from the last good result, a row the services' login may insert: a
    # "good" result past the log's end would have every later check start there and find nothing.
    from worker.sealing import check

    keys = checkpoint.load_signing_keys(settings)
    # without a witness file, where the check resumes from the stored results alone (with one, it
    # keeps its place beside it: tests/core/test_audit_resume_place.py)
    runtime, owner = (roles_db[r].model_copy(update={"audit_witness_file": None}) for r in ("runtime", "owner"))
    ids = record_and_seal(runtime, keys, 3)
    assert check(runtime, keys).ok
    forged = merkle.CompactRange(2**20, [bytes(32)])
    with session_scope(runtime) as session:
        audit_resume.report_row(
            session, audit_verify.LogReport(True, 0, forged.size, forged.root(), frontier=forged.hashes)
        )
    with unguarded(owner, "audit_events") as connection:
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 7}' WHERE id = :id"), {"id": ids[1]})
    report = check(runtime, keys)  # from the start: no signed checkpoint has the forged size and root
    assert not report.ok and (report.first_bad_seq, report.first_bad_event_id) == (1, ids[1]), report


def test_the_age_of_the_oldest_unsealed_event_is_how_far_sealing_lags(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 1)
    with session_scope(runtime) as session:
        assert audit_log.unsealed_age(session) is None
        written = time.monotonic()
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
    with session_scope(runtime) as session:
        support.wait_for(  # committed once no older transaction runs (a parallel test's may)
            lambda: audit_log.unsealed_age(session) is not None, timeout=60, what="the event to count as committed"
        )
        age = audit_log.unsealed_age(session)
    assert age is not None and 0 <= age <= time.monotonic() - written + 0.5  # by the database's clock
    support.seal_all(runtime)
    with session_scope(runtime) as session:
        assert audit_log.unsealed_age(session) is None


def test_a_sealer_started_before_a_signing_key_rotation_reads_the_new_key_file(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process that loaded the old key cannot verify a checkpoint a newer process signed with the new
    # one: it took that for a tampered log and stopped sealing, until it was restarted.
    from dataclasses import replace

    from worker import sealing

    old = checkpoint.generate(settings.audit_log_origin)
    runtime = roles_db["runtime"].model_copy(update={"audit_signing_key_file": tmp_path / "signing.json"})
    checkpoint.write_signing_keys(tmp_path / "signing.json", old)
    record_and_seal(runtime, old, 1)
    rotated = replace(checkpoint.generate(settings.audit_log_origin), retired=(old.signer.verifier,))
    checkpoint.write_signing_keys(tmp_path / "signing.json", rotated)
    record_and_seal(runtime, rotated, 1)  # a newer process signs with the new key
    monkeypatch.setattr(sealing, "_keys", old)  # this one still holds the old
    with session_scope(runtime) as session:
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)

    def sealed_one() -> audit_log.SealResult | None:  # once no older transaction runs (a parallel test's may)
        result = sealing._seal_once(runtime)
        return result if result is not None and result.sealed else None

    assert support.wait_for(sealed_one, timeout=30, what="the event to be sealed").size == 3
    assert sealing._keys is not None and sealing._keys.signer.verifier == rotated.signer.verifier


@pytest.mark.parametrize("forgery", ["older-note", "no-checkpoint"])
def test_the_sealer_signs_nothing_over_a_checkpoint_row_its_note_does_not_vouch_for(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings, forgery: str
) -> None:
    # The owner swaps the latest checkpoint's row for one holding an older genuine note, or removes the
    # checkpoints: either would let the sealer sign over whatever the stored tree holds now.
    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    record_and_seal(runtime, keys, 3)
    with unguarded(owner, "audit_checkpoints") as connection:
        if forgery == "older-note":
            older = connection.scalar(text("SELECT note FROM audit_checkpoints WHERE size = 1"))
            connection.execute(text("UPDATE audit_checkpoints SET note = :note WHERE size = 3"), {"note": older})
        else:
            connection.execute(text("DELETE FROM audit_checkpoints"))
    with session_scope(runtime) as session:
        audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
    refused = "differs from its signed note" if forgery == "older-note" else "holds 3 events and no signed checkpoint"
    with pytest.raises(audit_log.TamperedLog, match=refused):
        support.seal_all(runtime)


def test_a_checkpoint_row_its_note_does_not_vouch_for_is_never_shown_as_verified(roles_db, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """The services' login inserts a latest checkpoint row holding an older genuine note beside a size
    and root of its choosing: `dermq audit checkpoint --json` printed that size and root as verified,
    and `audit verify --against` passed where `audit verify` failed."""
    from core import audit_commands

    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 3)
    with session_scope(runtime) as session:
        pinned = session.scalar(text("SELECT note FROM audit_checkpoints WHERE size = 3"))
        older = session.scalar(text("SELECT note FROM audit_checkpoints WHERE size = 1"))
    assert audit_commands.latest_checkpoint(runtime, keys.verifiers)["size"] == 3  # type: ignore[index]
    with session_scope(runtime) as session:
        session.execute(
            text("INSERT INTO audit_checkpoints (size, root, signed_at, note) VALUES (99, :root, now(), :note)"),
            {"root": bytes(32), "note": older},
        )
    with pytest.raises(checkpoint.CheckpointError, match="differs from its signed note"):
        audit_commands.latest_checkpoint(runtime, keys.verifiers)
    with session_scope(runtime) as session:
        _, report = audit_verify.verify_against(session, pinned, keys.verifiers)
    assert not report.ok and "differs from its signed note" in (report.reason or "")


def test_a_check_out_of_time_stops_at_a_signed_checkpoint_and_the_next_one_goes_on_from_there(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings
) -> None:
    # A from-scratch walk of a long log (after a failure, or the first check of a large one) would run
    # past the task's time limit, store nothing and start over each minute: it keeps what it did.
    from worker.sealing import check

    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 4)  # a signed checkpoint at each size
    first = check(runtime, keys, budget=0)  # out of time at once: stops at each checkpoint it meets
    with session_scope(runtime) as session:  # auditors are told no verdict until one reaches the end
        assert audit_resume.latest_verdict(session) is None
    reports = [first, *checks_until_complete(runtime, keys, budget=0)]
    with session_scope(runtime) as session:
        verdict = audit_resume.latest_verdict(session)
        assert verdict is not None and (verdict.ok, verdict.size) == (True, 4)
    assert [(r.ok, r.size, r.complete) for r in reports] == [
        (True, 1, False),
        (True, 2, False),
        (True, 3, False),
        (True, 4, False),
        (True, 4, True),
    ]


def test_after_a_failure_the_check_walks_again_from_the_last_good_place_before_it_not_from_the_start(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings
) -> None:
    from worker.sealing import check

    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    ids = record_and_seal(runtime, keys, 3)
    assert check(runtime, keys).ok
    ids += record_and_seal(runtime, keys, 2)
    with unguarded(owner, "audit_events") as connection:  # an edit the walk finds: its leaf no longer matches
        connection.execute(text("UPDATE audit_events SET detail = '{\"i\": 7}' WHERE id = :id"), {"id": ids[4]})
    failed = check(runtime, keys)
    again = check(runtime, keys)
    assert (failed.ok, failed.first_bad_seq, failed.first_bad_event_id) == (False, 4, ids[4]), failed
    assert (again.ok, again.first_bad_seq) == (False, 4) and again.checked == 1  # from 3 (from 0: 4 walked)


def test_a_check_far_behind_loads_a_window_of_checkpoints_and_stops_at_its_last(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings
) -> None:
    # catching up (the first check of a long log, or after a failure): loading every checkpoint from
    # its start on (one a second, 31 million a year) would not fit the task, whatever the walk's budget

    keys = checkpoint.load_signing_keys(settings)
    runtime = roles_db["runtime"]
    record_and_seal(runtime, keys, 5)
    reports = checks_until_complete(runtime, keys, window=2)
    assert [(r.ok, r.size, r.complete) for r in reports] == [(True, 2, False), (True, 4, False), (True, 5, True)]


def checks_until_complete(
    settings: Settings, keys: checkpoint.SigningKeys, **limits: Any
) -> list[audit_verify.LogReport]:
    """The periodic check run with ``limits`` until one reaches the log's end (ten at most)."""
    from worker.sealing import check

    reports = [check(settings, keys, **limits)]
    while not reports[-1].complete and len(reports) < 10:
        reports.append(check(settings, keys, **limits))
    return reports


def test_a_temporary_table_cannot_stand_in_for_the_guards_sequence(roles_db) -> None:  # type: ignore[no-untyped-def]
    """The guards read their sequences through the caller's search path, which begins with its
    temporary schema: a temporary ``audit_verifications`` whose sequence stood far ahead let a forged
    "the log verifies" row through, to stay the latest for good. The services' login may create no
    temporary table now, and the guards name public's sequences (the owner, who may, shows it)."""
    runtime = create_engine(roles_db["runtime"].database_url)
    try:
        with pytest.raises(DBAPIError, match="permission denied"), runtime.begin() as connection:
            connection.execute(text("CREATE TEMP TABLE audit_verifications (id bigserial)"))
    finally:
        runtime.dispose()
    owner = create_engine(roles_db["owner"].database_url)
    try:
        with pytest.raises(DBAPIError, match="id comes from its sequence"), owner.begin() as connection:
            connection.execute(text("CREATE TEMP TABLE audit_verifications (id bigserial)"))
            ahead = "SELECT setval(pg_get_serial_sequence('audit_verifications', 'id'), 9000000000000000000)"
            connection.execute(text(ahead))
            connection.execute(
                text(
                    "INSERT INTO public.audit_verifications (id, ok, size, root, checked) "
                    "VALUES (9000000000000000000 - 1, true, 1, NULL, 1)"
                )
            )
    finally:
        owner.dispose()


def test_a_replica_session_still_meets_the_append_only_triggers(roles_db) -> None:  # type: ignore[no-untyped-def]
    """A login allowed to set session_replication_role (a grant on the parameter, a managed database's
    admin role) ran as a replica and skipped triggers enabled the default way."""
    superuser = create_engine(roles_db["superuser"].database_url)
    try:
        with superuser.begin() as connection:
            connection.execute(text(EVENT.format(extra="", values="")))
        with pytest.raises(DBAPIError, match="append-only"), superuser.begin() as connection:
            connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(text("UPDATE audit_events SET detail = '{\"rewritten\": true}'"))
    finally:
        superuser.dispose()


def test_a_login_that_may_act_as_a_replica_is_refused_in_production(roles_db) -> None:  # type: ignore[no-untyped-def]
    from core import db_roles

    runtime = make_url(roles_db["runtime"].database_url).username
    superuser = create_engine(roles_db["superuser"].database_url)
    production = roles_db["runtime"].model_copy(update={"environment": "production"})
    engine = create_engine(production.database_url)
    try:
        with superuser.begin() as connection:
            connection.execute(text(f'GRANT SET ON PARAMETER session_replication_role TO "{runtime}"'))
        with engine.connect() as connection, pytest.raises(db_roles.InsecureLoginError, match="replication"):
            db_roles.check_login(connection, production)
    finally:
        with superuser.begin() as connection:
            connection.execute(text(f'REVOKE SET ON PARAMETER session_replication_role FROM "{runtime}"'))
        engine.dispose()
        superuser.dispose()
