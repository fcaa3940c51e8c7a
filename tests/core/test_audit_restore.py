"""The audit log after a restore from a dump into another cluster (docs/OPERATIONS.md, "Restore").

``pg_dump`` keeps each event's transaction id, the sealer's order, and a new cluster's own ids start
far below the old cluster's: the sealer used to wait for events after its last one in that order, so
it sealed nothing written after the restore (nor what the dump held unsealed). And once the new
cluster's ids reach the restored ones, restored events, long sealed, come after its place again:
they must not be sealed twice. Two private clusters stand in for the old and the new one; the old
one's transaction ids are set ahead with ``pg_resetwal``, and so are the new one's later.
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

#: the old cluster's next transaction id, and the new one's later, past every restored event's: each
#: the first of a commit-log segment (2^20 transactions), which the server then creates
OLD_CLUSTER_XID = 2 * 2**20
NEW_CLUSTER_LATER_XID = 3 * 2**20


@pytest.fixture
def clusters() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    root = Path(tempfile.mkdtemp(prefix="dermq-restore-"))
    root.chmod(0o755)  # the postgres user must reach the cluster folders inside
    old, new = PostgresCluster(root / "old"), PostgresCluster(root / "new")
    try:
        old.init()
        old._run("pg_resetwal", "-x", str(OLD_CLUSTER_XID), "-D", str(old.data))
        old.start()
        new.init()
        new.start()
        yield old, new
    finally:
        dispose_engines()
        old.destroy()
        new.destroy()
        shutil.rmtree(root, ignore_errors=True)


def postgres(cluster: PostgresCluster, *args: str) -> None:
    subprocess.run([args[0], "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", *args[1:]], check=True)


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


def test_a_database_restored_into_another_cluster_goes_on_sealing(
    settings: Settings, clusters: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    old_cluster, new_cluster = clusters
    old = settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{old_cluster.port}/dermq",
            "audit_witness_file": tmp_path / "old-witness.log",
        }
    )
    postgres(old_cluster, "createdb", "dermq")
    support.migrate(old.database_url)
    sealed_before = record(old, 3, "before")
    support.seal_all(old)
    unsealed_in_dump = record(old, 2, "in-flight")  # committed, not yet sealed when the dump ran
    dump = tmp_path / "dermq.dump"
    postgres(old_cluster, "pg_dump", "-Fc", "-f", str(dump), "dermq")
    dispose_engines()

    postgres(new_cluster, "createdb", "dermq")
    postgres(new_cluster, "pg_restore", "--no-owner", "-d", "dermq", str(dump))
    new = old.model_copy(
        update={
            "database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{new_cluster.port}/dermq",
            "audit_witness_file": tmp_path / "new-witness.log",
        }
    )
    with session_scope(new) as session:
        assert int(session.scalar(text("SELECT pg_current_xact_id()::text"))) < OLD_CLUSTER_XID  # a younger cluster
    after_restore = record(new, 2, "after")
    support.seal_all(new, timeout=30)
    assert sealed(new)[-7:] == [*sealed_before, *unsealed_in_dump, *after_restore]

    # the new cluster's transaction ids pass the restored events': those stay sealed once, and on it goes
    dispose_engines()
    new_cluster.stop()
    new_cluster._run("pg_resetwal", "-x", str(NEW_CLUSTER_LATER_XID), "-D", str(new_cluster.data))
    new_cluster.start()
    later = record(new, 2, "later")
    support.seal_all(new, timeout=30)
    order = sealed(new)
    assert order[-9:] == [*sealed_before, *unsealed_in_dump, *after_restore, *later]
    assert len(order) == len(set(order))
    with session_scope(new) as session:
        assert audit_log.oldest_unsealed(session) is None
        assert audit_verify.verify_log(session, verifiers=load_signing_keys(new).verifiers).ok
