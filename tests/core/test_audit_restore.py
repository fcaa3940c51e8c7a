"""The audit log after restores from dumps into other clusters (docs/OPERATIONS.md, "Restore").

``pg_dump`` keeps each event's transaction id, the sealer's order, and a new cluster's own ids may lie
far below the old cluster's. The sealer used to wait for events after its last one in that order:
it sealed nothing written after a restore, nor what the dump held unsealed. The cluster's ids then
come to pass the restored ones, before or after the sealer runs again: restored events, long sealed,
come after its place once more and must not be sealed twice, and the new cluster's own must not be
skipped. A second restore brings the first one's events back after the place too. Private clusters
stand in for the three; their transaction ids are set with ``pg_resetwal``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from core import audit, audit_log, audit_verify
from core.checkpoint import load_signing_keys
from core.config import Settings
from core.db import dispose_engines, session_scope
from tests import support
from tests.faults.servers import PostgresCluster, postgres_bin

pytestmark = [
    pytest.mark.usefixtures("database"),
    pytest.mark.skipif(postgres_bin() is None, reason="needs the PostgreSQL server binaries"),
]

#: transaction ids set with pg_resetwal, each the first of a commit-log segment (2^20 transactions),
#: which the server then creates
SEGMENT = 2**20


@pytest.fixture
def clusters(request: pytest.FixtureRequest) -> Iterator[list[PostgresCluster]]:
    """``request.param`` fresh private clusters, started."""
    root = Path(tempfile.mkdtemp(prefix="dermq-restore-"))
    root.chmod(0o755)  # the postgres user must reach the cluster folders inside
    made = [PostgresCluster(root / str(n)) for n in range(request.param)]
    try:
        for cluster in made:
            cluster.init()
            cluster.start()
        yield made
    finally:
        dispose_engines()
        for cluster in made:
            cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


def client(cluster: PostgresCluster, *args: str) -> None:
    subprocess.run([args[0], "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", *args[1:]], check=True)


def next_transaction_id(cluster: PostgresCluster, xid: int) -> None:
    dispose_engines()
    cluster.stop()
    cluster._run("pg_resetwal", "-x", str(xid), "-D", str(cluster.data))
    cluster.start()


def on(settings: Settings, cluster: PostgresCluster, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{cluster.port}/dermq",
            "audit_witness_file": tmp_path / f"witness-{cluster.port}.log",  # the shared one is other tests'
        }
    )


def record(settings: Settings, n: int, label: str) -> list[int]:
    ids = []
    for i in range(n):
        with session_scope(settings) as session:
            ids.append(
                audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM, detail={label: i})
            )
    return ids


def sealed(settings: Settings) -> list[int]:
    with session_scope(settings) as session:
        return list(session.scalars(text("SELECT event_id FROM audit_leaves ORDER BY seq")))


def dump_into(source: PostgresCluster, target: PostgresCluster, tmp_path: Path) -> None:
    dump = tmp_path / f"dump-{source.port}"
    client(source, "pg_dump", "-Fc", "-f", str(dump), "dermq")
    dispose_engines()
    client(target, "createdb", "dermq")
    client(target, "pg_restore", "--no-owner", "-d", "dermq", str(dump))


def old_cluster_events(settings: Settings, a: PostgresCluster, tmp_path: Path) -> tuple[list[int], list[int]]:
    """On cluster ``a``, far ahead of a new one: events sealed, then events not sealed when it is dumped."""
    next_transaction_id(a, 2 * SEGMENT)
    client(a, "createdb", "dermq")
    support.migrate(on(settings, a, tmp_path).database_url)
    sealed_ones = record(on(settings, a, tmp_path), 3, "a")
    support.seal_all(on(settings, a, tmp_path))
    return sealed_ones, record(on(settings, a, tmp_path), 2, "a-unsealed")


@pytest.mark.parametrize("clusters", [2], indirect=True)
def test_a_restored_database_goes_on_sealing_when_its_ids_pass_the_old_ones_before_it_seals(
    settings: Settings, clusters: list[PostgresCluster], tmp_path: Path
) -> None:
    a, b = clusters
    first, unsealed_in_dump = old_cluster_events(settings, a, tmp_path)
    dump_into(a, b, tmp_path)
    in_b = record(on(settings, b, tmp_path), 1, "b")  # not sealed before b's ids pass a's
    next_transaction_id(b, 3 * SEGMENT)
    in_b += record(on(settings, b, tmp_path), 1, "b-later")
    support.seal_all(on(settings, b, tmp_path), timeout=30)
    order = sealed(on(settings, b, tmp_path))
    # each once (in the cluster's transaction-id order now: b's first event, then a's, then b's last)
    assert order[-7:-4] == first and sorted(order[-4:]) == [*unsealed_in_dump, *in_b]
    assert len(order) == len(set(order))
    with session_scope(on(settings, b, tmp_path)) as session:
        assert audit_log.unsealed_age(session) is None
        assert audit_verify.verify_log(session, verifiers=load_signing_keys(settings).verifiers).ok


@pytest.mark.parametrize("clusters", [3], indirect=True)
def test_a_database_restored_twice_seals_every_event_once(
    settings: Settings, clusters: list[PostgresCluster], tmp_path: Path
) -> None:
    a, b, c = clusters
    first, unsealed_in_dump = old_cluster_events(settings, a, tmp_path)
    dump_into(a, b, tmp_path)
    next_transaction_id(b, SEGMENT)  # younger than a's restored events still
    in_b = record(on(settings, b, tmp_path), 2, "b")
    support.seal_all(on(settings, b, tmp_path), timeout=30)
    assert sealed(on(settings, b, tmp_path))[-7:] == [*first, *unsealed_in_dump, *in_b]

    # b's place, in b's ids, lies in c's future; a's events, in a's larger ones, lie after it again
    dump_into(b, c, tmp_path)
    in_c = record(on(settings, c, tmp_path), 2, "c")
    support.seal_all(on(settings, c, tmp_path), timeout=30)
    order = sealed(on(settings, c, tmp_path))
    assert order[-9:] == [*first, *unsealed_in_dump, *in_b, *in_c] and len(order) == len(set(order))
    with session_scope(on(settings, c, tmp_path)) as session:
        assert audit_log.unsealed_age(session) is None
        assert audit_verify.verify_log(session, verifiers=load_signing_keys(settings).verifiers).ok
