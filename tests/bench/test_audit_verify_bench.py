"""``python -m bench.audit_verify``: builds a throw-away database with an old hash chain, seals it into
the Merkle log (a signed checkpoint each ``--seal-every`` events, witnessed in a scratch file) and
times both verifications. A short run must get through (it stopped at its first insert once
migration 0014's guard refused the old chain's rows), say how much memory the check held, and drop
its database."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

from sqlalchemy import create_engine, text

from tests import support

ROW = re.compile(r"^(old hash chain \(baseline\)|merkle log vs checkpoints|sealing \(one-off\))\s+[0-9.]+\s+[0-9]+")


def test_a_short_run_verifies_both_trails_and_drops_its_database() -> None:
    database = f"dermq_bench_audit_{uuid.uuid4().hex[:8]}"
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.audit_verify",
                "--events",
                "400",
                "--seal-every",
                "50",
                "--database",
                database,
            ],
            cwd=support.ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        admin = create_engine("postgresql+psycopg2:///postgres")
        try:
            with admin.connect() as connection:
                query = text("SELECT count(*) FROM pg_database WHERE datname = :name")
                left = connection.scalar(query, {"name": database})
        finally:
            admin.dispose()
    finally:
        support.drop_database(f"postgresql+psycopg2:///{database}")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m[1] for line in run.stdout.splitlines() if (m := ROW.match(line))}
    assert rows == {"old hash chain (baseline)", "merkle log vs checkpoints", "sealing (one-off)"}, run.stdout
    assert "checkpoints checked: 8" in run.stdout  # every checkpoint met: 400 events, one each 50
    assert re.search(r"memory the merkle verification held at its peak: [0-9.]+ MB \(8 checkpoints", run.stdout)
    assert left == 0
