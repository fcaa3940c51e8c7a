"""docs/OPERATIONS.md's "Rotate encryption keys", run as an operator would on a live system: a real API
and worker taking and classifying cases all along, the doc's lines run one by one as written (the
backup folder renamed); then deploy/README.md's compose route ("Rotating the key file in a
deployment"): ``rotate --no-rewrap`` on a private copy put in place of the secret the processes read,
``rewrap`` and ``status`` once they read it, and ``retire`` the same way as the rotation. No submission
fails, every case reads back whole afterwards (image, result, heat map, client reference), the running
processes take each new file without a restart, and the retired keys open nothing any more."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core import case_images
from core.config import Settings
from core.crypto import load_keyring
from core.db import dispose_engines, session_scope
from core.models import ClinicCallback
from tests import support
from tests.conftest import Tenant, new_tenant
from tests.processes import api_process, start_worker

OPERATIONS = (support.ROOT / "docs" / "OPERATIONS.md").read_text()
DEPLOY = (support.ROOT / "deploy" / "README.md").read_text()


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def command_lines(block: str) -> list[str]:
    """A block's command lines, comments and blank lines left out."""
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class Site:
    folder: Path
    env: dict[str, str]  # the services' (and the commands', as in a worker container)

    @property
    def key_file(self) -> Path:
        return Path(self.env["DERMQ_KEY_FILE"])

    @property
    def settings(self) -> Settings:
        return support.settings_for(self.env)

    def shell(self, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` in bash (stopping at the first failure), ``dermq`` being these sources' command."""
        return subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=self.folder,
            env={"PATH": f"{self.folder / 'bin'}:/usr/bin:/bin", "HOME": str(self.folder), **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, script: str) -> str:
        done = self.shell(script)
        assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def active(self) -> str:
        return str(json.loads(self.key_file.read_text())["active"])


@pytest.fixture
def site(own_database: Settings, private_broker, tmp_path: Path) -> Site:  # type: ignore[no-untyped-def]
    """A key file of its own made by ``dermq keys init``, on this module's database and broker; the
    period-key folder named as compose and Kubernetes name it (``DERMQ_PERIOD_KEY_DIR``)."""
    env = support.test_env(
        tmp_path,
        DERMQ_DATABASE_URL=own_database.database_url,
        DERMQ_REDIS_URL=private_broker.url,
        DERMQ_PERIOD_KEY_DIR=str(tmp_path / "period-keys"),
        DERMQ_API_PORT=str(support.free_port()),
        PYTHONPATH=str(support.ROOT),
    )
    (tmp_path / "bin").mkdir()
    dermq = tmp_path / "bin" / "dermq"
    dermq.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli "$@"\n')
    dermq.chmod(0o755)
    made = Site(tmp_path, env)
    made.ok("dermq keys init")
    return made


@dataclass
class Traffic:
    """A clinic submitting a case after another (``?wait``) and reading each back, on a thread of its own."""

    base: str
    settings: Settings
    tenant: Tenant
    image: bytes
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, headers=self.tenant.headers, timeout=60) as http:
            while not self.stopping.is_set():
                ref = f"MRN-{len(self.done)}"
                try:
                    sent = http.post(
                        "/v1/cases?wait=30",
                        files={"image": ("x.jpg", self.image, "image/jpeg")},
                        data={"client_ref": ref},
                    )
                    case = sent.json()
                    if sent.status_code not in (200, 201) or case.get("status") != "succeeded":
                        self.failed.append(f"{ref}: {sent.status_code} {sent.text}")
                        continue
                    again = http.get(f"/v1/cases/{case['id']}")
                    if again.status_code != 200 or again.json()["result"] != case["result"]:
                        self.failed.append(f"{ref} read: {again.status_code} {again.text}")
                    self.done.append(case)
                except (httpx.HTTPError, ValueError) as exc:
                    self.failed.append(f"{ref}: {exc!r}")

    def more(self, count: int = 2) -> None:
        """Wait until ``count`` more cases have been classified and read back."""
        target = len(self.done) + count
        support.wait_for(lambda: len(self.done) >= target or bool(self.failed), timeout=60, what="cases to finish")
        assert not self.failed, self.failed


@pytest.fixture
def traffic(site: Site, jpeg_bytes: bytes) -> Iterator[Traffic]:
    """The API and a worker running, and a clinic's submissions under way (stopped at the end)."""
    settings = site.settings
    tenant = new_tenant(settings, load_keyring(settings))
    with api_process(site.env, site.folder / "api.log") as (base, _):
        worker = start_worker(site.env, site.folder / "worker.log")
        running = Traffic(base, settings, tenant, jpeg_bytes)
        try:
            running.thread.start()
            yield running
        finally:
            running.stopping.set()
            running.thread.join(90)
            worker.stop()
            dispose_engines()


def callback_registered(traffic: Traffic) -> str:
    """Register the clinic's callback (again) through the API; the KEK its new secret is sealed under."""
    answer = httpx.put(
        f"{traffic.base}/v1/clinic/callback",
        headers=traffic.tenant.headers,
        json={"url": "http://127.0.0.1:9/hook"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return callback_kek(traffic)


def callback_kek(traffic: Traffic) -> str:
    with session_scope(traffic.settings) as session:
        row = select(ClinicCallback.kek_id).where(ClinicCallback.clinic_id == traffic.tenant.clinic_id)
        return str(session.scalar(row))


def status_rows(site: Site) -> dict[str, dict[str, Any]]:
    return {row["kek_id"]: row for row in json.loads(site.ok("dermq keys status --json"))}


def retired_opens_nothing(site: Site, traffic: Traffic, retired: str, backup: Path) -> None:
    """``retired`` is out of the key file and nothing needs it (``keys status``), no period key is wrapped
    under it, and the key file backed up before its rotation opens no case any more."""
    rows = status_rows(site)
    assert retired not in rows and all(row["in_key_file"] for row in rows.values()), rows
    assert retired not in json.loads(site.key_file.read_text())["keys"]
    for period in (site.folder / "period-keys").glob("*.json"):
        assert json.loads(period.read_text())["kek_id"] == site.active(), period
    assert callback_kek(traffic) == site.active()
    old = site.settings.model_copy(update={"key_file": backup})
    ids = [uuid.UUID(case["id"]) for case in traffic.done]
    with session_scope(site.settings) as session:
        images, unreadable = case_images.read_images(session, keyring=load_keyring(old), case_ids=ids)
    assert not images and set(unreadable) == set(ids)


def all_cases_read_back(traffic: Traffic) -> None:
    with httpx.Client(base_url=traffic.base, headers=traffic.tenant.headers, timeout=60) as http:
        for case in traffic.done:
            again = http.get(f"/v1/cases/{case['id']}")
            assert again.status_code == 200, again.text
            assert again.json()["client_ref"] == case["client_ref"] and again.json()["result"] == case["result"]
            heat = http.get(f"/v1/cases/{case['id']}/heatmap.png")
            assert heat.status_code == 200 and heat.content.startswith(b"\x89PNG"), heat.text


def test_key_rotation_as_written_on_a_live_stack(site: Site, traffic: Traffic) -> None:
    first = site.active()
    assert callback_registered(traffic) == first
    traffic.more()

    # docs/OPERATIONS.md, line by line
    lines = command_lines(sh_blocks(section(OPERATIONS, "Rotate encryption keys"))[0])
    assert [line.split()[:3] for line in lines[1:]] == [
        ["dermq", "keys", "rotate"],
        ["dermq", "keys", "status"],
        ["dermq", "keys", "retire"],
    ], lines
    (site.folder / "backups").mkdir(mode=0o700)
    site.ok(lines[0].replace("/secure/backups/", f"{site.folder}/backups/"))
    backup = site.folder / "backups" / "keys-before-rotation.json"
    rotated = site.ok(lines[1])
    second = site.active()
    assert second != first and rotated.strip().endswith("0 remain"), rotated
    traffic.more()
    status = site.ok(lines[2])
    (old_line,) = [line for line in status.splitlines() if line.startswith(first)]
    assert old_line.split()[1:] == ["0", "blobs"], status  # no period key under it either
    # "wait until every process has been running with it": the API seals a new secret under it at
    # once, and the worker goes on classifying (the period key it holds was re-wrapped under it)
    assert callback_registered(traffic) == second
    traffic.more()
    site.ok(lines[3].replace("<old-kek-id>", first))
    traffic.more()
    assert callback_registered(traffic) == second
    retired_opens_nothing(site, traffic, first, backup)

    # deploy/README.md's compose route: the processes read a key file that the commands only replace
    deployment = section(DEPLOY, "Rotating the key file in a deployment")
    compose = sh_blocks(deployment)[0].split("# Kubernetes")[0]
    assert "docker compose exec -T worker-cpu sh -c" in compose and "--no-rewrap" in compose
    private = site.folder / "container-tmp"
    private.mkdir(mode=0o700)
    as_here = (
        compose.replace("docker compose exec -T worker-cpu ", "")  # the worker's environment: this site's
        .replace("/run/secrets/dermq-keys.json", str(site.key_file))
        .replace("/tmp/k.json", str(private / "k.json"))
        .replace("sudo tee deploy/secrets/dermq-keys.json", f"tee {site.key_file}")  # the file the mount shows
    )
    backup = site.folder / "backups" / "keys-before-second-rotation.json"
    site.ok(f"cp {site.key_file} {backup}")
    # `tee` writes the secret in place (a file mount follows its inode: a file moved over it would stay
    # unseen): for a moment the processes find it empty, then cut short. Cases go on meanwhile.
    whole = site.key_file.read_bytes()
    for torn in (b"", whole[: len(whole) // 2]):
        site.key_file.write_bytes(torn)
        traffic.more()
        assert callback_registered(traffic) == second
    site.key_file.write_bytes(whole)
    site.ok(as_here)
    third = site.active()
    assert third not in (first, second)
    # "compose: at once": the API seals under the new key without a restart, and cases go on
    assert callback_registered(traffic) == third
    traffic.more()
    follow = re.search(r"run `(dermq keys rewrap)` and\s+`(dermq keys status)` in a worker", deployment)
    assert follow, "the compose route's re-wrap and status"
    rewrapped = site.ok(follow.group(1))
    assert rewrapped.strip().endswith("0 remain"), rewrapped
    status = site.ok(follow.group(2))
    (old_line,) = [line for line in status.splitlines() if line.startswith(second)]
    assert old_line.split()[1:] == ["0", "blobs"], status
    traffic.more()
    retire = "with `dermq keys retire <old-kek-id>` in place of `dermq keys rotate --no-rewrap`"
    assert retire in " ".join(deployment.split()), "the compose route's retirement"
    site.ok(as_here.replace("dermq keys rotate --no-rewrap", f"dermq keys retire {second}"))
    assert set(json.loads(site.key_file.read_text())["keys"]) == {third}
    traffic.more()
    assert callback_registered(traffic) == third

    traffic.stopping.set()
    traffic.thread.join(90)
    assert not traffic.failed, traffic.failed
    all_cases_read_back(traffic)
    retired_opens_nothing(site, traffic, second, backup)
    assert not (site.folder / "new-keys.json").exists() and not (private / "k.json").exists()
