"""``python -m bench.load`` on its own stack (a scratch database, an API, a worker, the sweeper and
the sealer), briefly: it runs, and its reliability tally says every accepted case ended once."""

from __future__ import annotations

import re
import subprocess
import sys

import redis

from bench import load_stack
from tests import support


def _value(output: str, measure: str) -> str:
    found = re.search(rf"^{re.escape(measure)}\s+(.+)$", output, re.MULTILINE)
    assert found, f"no {measure!r} row in:\n{output}"
    return found[1].strip()


def test_a_short_load_run_tallies_every_case_once() -> None:
    try:
        run = subprocess.run(
            [sys.executable, "-m", "bench.load", "--clients", "2", "--seconds", "3", "--wait", "20"],
            cwd=support.ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:  # the benchmark keeps its scratch database and Redis database for a look afterwards
        support.drop_database(f"postgresql+psycopg2:///{load_stack.DATABASE}")
        client = redis.Redis(db=load_stack.REDIS_DB)
        client.flushdb()
        client.close()
    assert run.returncode == 0, run.stderr[-3000:]
    # the layout it ran, set for its stack and resolved as the API and the worker resolve it
    assert "own stack: 1 API process, 1 worker child x 1 thread on " in run.stdout.splitlines()[0], run.stdout
    accepted = int(_value(run.stdout, "accepted (202, or 201 finished within ?wait=)"))
    assert accepted > 0 and int(_value(run.stdout, "completed (succeeded or failed, seen by the portal)")) == accepted
    for measure in ("lost (accepted, never ended in Postgres)", "duplicated (extra cases + cases with >1 result)"):
        assert _value(run.stdout, measure) == "0", run.stdout
    assert _value(run.stdout, "5xx answers") == "0", run.stdout
