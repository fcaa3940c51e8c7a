"""docs/OPERATIONS.md's "Back up and restore", run as an operator would: its backup and restore blocks,
line by line as written (the roles, database and paths renamed), against a database owned by its
owner role with the services on the runtime role, a real API and worker, and a Redis that lost its
data with the old host. Then the folder of period keys lost too (it is never backed up): the reads
and the intake refuse with 503 ``period_keys_unavailable``, and the doc's erasure of the cases sealed
under its keys lets the intake take cases again."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from core.config import Settings
from core.db import dispose_engines
from tests import support
from tests.core.audit_roles import admin_engine
from tests.processes import Worker, api_process, start_worker

OPERATIONS = (support.ROOT / "docs" / "OPERATIONS.md").read_text()
NAME = f"{support.TEST_DATABASE}_restore"
OWNER, RUNTIME = f"{NAME}_owner", f"{NAME}_rt"

pytestmark = [
    pytest.mark.usefixtures("database"),
    pytest.mark.skipif(shutil.which("pg_restore") is None, reason="needs pg_dump and pg_restore"),
]


def block(title: str, number: int) -> list[str]:
    """The command lines of the section ``title``'s ``sh`` block ``number`` (from 0), comments and blank
    lines left out."""
    section = OPERATIONS.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(found) > number, f"{title}: no block {number}"
    lines = [line.split("  #")[0].strip() for line in found[number].splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class Site:
    folder: Path
    env: dict[str, str]  # the services': the runtime login
    owner_url: str
    superuser_url: str

    def shell(self, line: str, **env: str) -> subprocess.CompletedProcess[str]:
        """One line of the doc in bash, ``dermq`` being these sources' command, with the owner's login
        (the doc's commands run as the migrations do) and a libpq URL of it in ``$DATABASE_URL``."""
        owner = make_url(self.owner_url)
        script = f'dermq() {{ "{sys.executable}" -m cli "$@"; }}\n{line}'
        variables = {
            **os.environ,
            **self.env,
            "PYTHONPATH": str(support.ROOT),
            "DERMQ_DATABASE_URL": self.owner_url,
            "DATABASE_URL": f"postgresql://{owner.username}@/{owner.database}",
            **env,
        }
        return subprocess.run(
            ["bash", "-c", script], cwd=self.folder, env=variables, capture_output=True, text=True, timeout=300
        )

    def ok(self, line: str, **env: str) -> str:
        done = self.shell(line, **env)
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout


@pytest.fixture
def site(settings: Settings, private_broker, tmp_path: Path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    """A database made by the superuser and given to the owner role by ``dermq db roles``, migrated by
    the owner with the runtime role granted (as compose's first start does); a key file of its own."""
    base = make_url(settings.database_url).set(database=NAME)
    superuser_url = base.render_as_string(False)
    support.recreate_database(superuser_url)
    env = support.test_env(
        tmp_path,
        DERMQ_DATABASE_URL=base.set(username=RUNTIME).render_as_string(False),
        DERMQ_REDIS_URL=private_broker.url,
        DERMQ_SWEEP_INTERVAL_SECONDS="2",
        DERMQ_REQUEUE_GRACE_SECONDS="1",
    )
    made = Site(tmp_path, env, base.set(username=OWNER).render_as_string(False), superuser_url)
    try:
        made.ok(f"dermq db roles --owner {OWNER} --runtime {RUNTIME}", DERMQ_DATABASE_URL=superuser_url)
        made.ok("dermq keys init")
        made.ok("dermq db upgrade", DERMQ_DATABASE_RUNTIME_ROLE=RUNTIME)
        yield made
    finally:
        dispose_engines()
        support.drop_database(superuser_url)
        admin = admin_engine(settings)
        with admin.connect() as connection:
            for role in (OWNER, RUNTIME):
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.fixture
def stack(site: Site, private_broker) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    """What the test starts (an API, a worker running beat), stopped at the end whatever happens."""
    started: dict[str, object] = {}
    yield started
    for thing in started.values():
        if isinstance(thing, Worker):
            thing.stop()


def worker(site: Site) -> Worker:
    beat = ["--beat", "--schedule", str(site.folder / "beat-schedule")]  # the sweeper and the sealer
    return start_worker(site.env, site.folder / "worker.log", extra=beat)


def submit(base: str, token: str, image: bytes, ref: str, *, wait: bool) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/cases" + ("?wait=30" if wait else ""),
        headers={"Authorization": f"Bearer {token}"},
        files={"image": ("x.jpg", image, "image/jpeg")},
        data={"client_ref": ref},
        timeout=60,
    )


def read(base: str, token: str, case_id: str, *, wait: int = 0) -> httpx.Response:
    query = f"?wait={wait}" if wait else ""
    return httpx.get(f"{base}/v1/cases/{case_id}{query}", headers={"Authorization": f"Bearer {token}"}, timeout=60)


def restore_lines(site: Site, dump: Path) -> tuple[list[str], list[str]]:
    """The restore block, renamed for this site: the lines before the stack starts, and those after."""
    lines = [
        re.sub(r"(?<=--dbname=)dermq\b|(?<=--owner=dermq_owner )dermq\b", NAME, line)
        .replace("dermq_owner", OWNER)
        .replace("dermq_app", RUNTIME)
        .replace("dermq-YYYY-MM-DD.dump", dump.name)
        for line in block("Back up and restore", 1)
    ]
    first = next(i for i, line in enumerate(lines) if line.startswith("dermq audit verify"))
    return lines[:first], lines[first:]


def test_a_backup_restored_as_written_serves_its_cases_and_a_lost_period_key_folder_is_erased_away(  # type: ignore[no-untyped-def]
    site: Site, stack: dict[str, object], private_broker, jpeg_bytes: bytes
) -> None:
    site.ok("dermq clinic create 'restored clinic'")
    token = json.loads(site.ok("dermq key create --clinic 'restored clinic' --json"))["key"]
    env = {**site.env, "DERMQ_API_PORT": str(support.free_port())}
    with api_process(env, site.folder / "api.log") as (base, _):
        stack["worker"] = worker(site)
        done = [submit(base, token, jpeg_bytes, f"MRN-{i}", wait=True).json() for i in range(2)]
        assert [case["status"] for case in done] == ["succeeded"] * 2, done
        stack.pop("worker").stop()  # type: ignore[attr-defined]
        queued = submit(base, token, jpeg_bytes, "MRN-queued", wait=False).json()
        assert queued["status"] == "queued"
        support.seal_all(support.settings_for(site.env))
        checkpoint = json.loads(site.ok("dermq audit checkpoint --json"))["checkpoint"]
        (site.folder / "pinned.checkpoint").write_text(checkpoint)  # the auditor's, before the backup

        backup = block("Back up and restore", 0)
        assert backup[0].startswith("pg_dump") and backup[1].startswith("install -m 600 /run/secrets/dermq-keys.json")
        site.ok(backup[0])
        (site.folder / "secure").mkdir()
        site.ok(backup[1].replace("/run/secrets/dermq-keys.json", "keys.json").replace("/secure/backups/", "secure/"))
    (dump,) = site.folder.glob("dermq-*.dump")

    # The disaster: the database gone, and the old host's Redis with it.
    dispose_engines()
    support.drop_database(site.superuser_url)
    import redis

    redis.Redis.from_url(private_broker.url).flushall()
    before_stack, after_stack = restore_lines(site, dump)
    for line in before_stack:  # createdb and pg_restore need a superuser: the default libpq login here
        site.ok(line)
    aside = site.folder / "before-restore"
    aside.mkdir()
    for witness in site.folder.glob("audit-witness.log*"):  # "Start a new witness file before the stack"
        witness.rename(aside / witness.name)

    with api_process(env, site.folder / "api.log") as (base, _):
        stack["worker"] = worker(site)
        for line in after_stack:
            if line.startswith("dermq keys destroy-period"):  # only for a period destroyed after the backup
                states = [row.split()[1] for row in site.ok("dermq keys periods").splitlines()[1:]]
                assert states and "destroyed" not in states
                continue
            site.ok(line)
        # The restored cases read back, their sealed client references and results with them, and the
        # case queued at backup time is picked up by the sweeper (its message was lost with Redis).
        for case in done:
            again = read(base, token, case["id"])
            assert again.status_code == 200 and again.json()["client_ref"] == case["client_ref"], again.text
            assert again.json()["result"] == case["result"]
        finished = read(base, token, queued["id"], wait=30).json()
        assert finished["status"] == "succeeded" and finished["client_ref"] == "MRN-queued", finished

        # The period-key folder lost as well: reads and the intake refuse, naming the volume ...
        folder = site.folder / "period-keys"
        folder.rename(aside / "period-keys")
        folder.mkdir(mode=0o700)
        for refused in (read(base, token, done[0]["id"]), submit(base, token, jpeg_bytes, "MRN-new", wait=False)):
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "period_keys_unavailable", refused.text
        # ... until every case sealed under its keys is erased, as the doc says.
        lost = re.search(r"`(SELECT DISTINCT case_id FROM case_blobs[^`]*)`", OPERATIONS)
        assert lost, "the doc's query of the cases sealed under period keys"
        query = f'psql --dbname={NAME} --no-align --tuples-only --command="{lost.group(1)}"'
        ids = site.ok(query).split()
        assert sorted(ids) == sorted([*(case["id"] for case in done), queued["id"]])
        for case_id in ids:
            site.ok(f"dermq case erase --yes {case_id}")
        assert site.ok(query).split() == []
        fresh = submit(base, token, jpeg_bytes, "MRN-new", wait=True)
        assert fresh.status_code in (200, 201) and fresh.json()["status"] == "succeeded", fresh.text
        assert read(base, token, done[0]["id"]).json()["status"] == "purged"  # erased: its row stays
