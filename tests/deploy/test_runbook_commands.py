"""The runbook's own commands show what they promise: the readiness one-liner prints a 503's status
and body (urllib raised at the 503 and printed a traceback, never the body that names what is down),
and the grep for failed requests matches the API's request log lines (it looked for ``"status": 5``,
a key those lines do not have)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.logs import JsonFormatter
from tests.local_site import QuietHandler, serving

RUNBOOK = (Path(__file__).resolve().parents[2] / "deploy" / "RUNBOOK.md").read_text()
NOT_READY = {"status": "not_ready", "checks": {"database": "unavailable", "redis": "ok"}}


class NotReady(QuietHandler):
    def do_GET(self) -> None:
        self.answer(503, "application/json", json.dumps(NOT_READY).encode())


@pytest.fixture
def not_ready_api() -> Iterator[int]:
    with serving(NotReady) as base:
        yield int(base.rsplit(":", 1)[1])


def test_the_readiness_one_liner_prints_a_503_and_what_is_down(not_ready_api: int) -> None:
    found = re.search(r'Readiness names the dependency.*?`docker compose exec api python -c "(.+?)"`', RUNBOOK, re.S)
    assert found, "the runbook's readiness command"
    code = found.group(1).replace("8000", str(not_ready_api))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    status, body = run.stdout.split(" ", 1)
    assert status == "503" and json.loads(body)["checks"]["database"] == "unavailable"


def test_the_grep_for_failed_requests_matches_the_apis_request_lines() -> None:
    found = re.search(r"docker compose logs api \| grep '([^']+)'", RUNBOOK)
    assert found, "the runbook's grep for failed requests"
    record = logging.LogRecord("dermq.api", logging.INFO, __file__, 1, "request", (), None)
    for key, value in {"event": "http_request", "route": "/v1/cases", "status_code": 503, "duration_ms": 2.5}.items():
        setattr(record, key, value)  # what api.middleware logs for each request
    failed = JsonFormatter("api").format(record)
    record.status_code = 201
    assert found.group(1) in failed and found.group(1) not in JsonFormatter("api").format(record)
