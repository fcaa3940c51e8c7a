"""The dermq-client command, run as a process against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Tenant


def dermq_client(live_api: str, tenant: Tenant, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DERMQ_BASE_URL": live_api, "DERMQ_API_KEY": tenant.token}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "client"), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "dermq_client", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_submit_wait_prints_the_finished_case(live_api: str, tenant: Tenant, worker, fixture_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = next(iter(fixture_images.values()))
    done = dermq_client(live_api, tenant, "submit", str(image), "--client-ref", "MRN-cli", "--urgent", "--wait")
    assert done.returncode == 0, done.stderr
    case = json.loads(done.stdout)
    assert case["status"] == "succeeded" and case["priority"] == "urgent" and case["client_ref"] == "MRN-cli"
    assert case["result"]["label"] in case["result"]["probabilities"]

    out = tmp_path / "heat.png"
    saved = dermq_client(live_api, tenant, "heatmap", case["id"], "-o", str(out))
    assert saved.returncode == 0, saved.stderr
    assert Path(out).read_bytes().startswith(b"\x89PNG")

    listed = dermq_client(live_api, tenant, "list")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [case["id"]]


def test_a_problem_is_printed_on_stderr_with_exit_status_1(live_api: str, tenant: Tenant) -> None:
    missing = dermq_client(live_api, tenant, "get", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1 and missing.stdout == ""
    assert json.loads(missing.stderr)["code"] == "case_not_found"
