"""A log cut short at its end, against the signed checkpoints the database still holds.

The owner's login deletes the newest events and their leaves (and the tree nodes above them) but not
the signed checkpoints of the longer log: those checkpoints, whose signature no database login can
forge, prove the log was longer. ``dermq audit verify`` run where there is no witness file (an
auditor's host, with the verifier key) must say so, not "audit log intact"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sqlalchemy import text

from core import audit_verify, checkpoint
from core.config import Settings
from core.db import session_scope
from tests import support
from tests.core.audit_roles import record_and_seal, unguarded


def test_a_log_cut_short_fails_against_the_stored_signed_checkpoints(  # type: ignore[no-untyped-def]
    roles_db, settings: Settings, tmp_path: Path
) -> None:
    keys = checkpoint.load_signing_keys(settings)
    runtime, owner = roles_db["runtime"], roles_db["owner"]
    ids = record_and_seal(runtime, keys, 6)  # a signed checkpoint at each size, 1 to 6
    with unguarded(owner, "audit_events", "audit_leaves", "audit_nodes") as connection:
        connection.execute(text("DELETE FROM audit_leaves WHERE seq >= 4"))
        connection.execute(text("DELETE FROM audit_nodes WHERE (idx + 1) * (1 << level) > 4"))
        connection.execute(text("DELETE FROM audit_events WHERE id = ANY(:ids)"), {"ids": ids[4:]})

    with session_scope(owner) as session:
        report = audit_verify.verify_log(session, verifiers=keys.verifiers, witness=None)
    assert not report.ok and report.first_bad_seq == 4, report
    assert "the log ends at 4 events; a signed checkpoint has 6" in (report.reason or ""), report

    cli = subprocess.run(
        [*support.DERMQ, "audit", "verify", "--verifier", keys.signer.verifier.encode()],
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "DERMQ_DATABASE_URL": owner.database_url,
            "DERMQ_KEY_FILE": str(settings.key_file),
            "DERMQ_AUDIT_WITNESS_FILE": str(tmp_path / "none.log"),  # the auditor's host has none
            "DERMQ_ENVIRONMENT": "test",
        },
    )
    assert cli.returncode == 1 and "AUDIT LOG BROKEN at position 4" in cli.stdout, cli.stdout + cli.stderr
