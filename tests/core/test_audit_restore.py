"""The audit log after a restore from a dump into another cluster (docs/OPERATIONS.md, "Restore").

``pg_dump`` keeps each event's transaction id, the sealer's order, and a new cluster's own ids start
far below the old cluster's: the sealer used to wait for events after its last one in that order, so
it sealed nothing written after the restore (nor what the dump held unsealed) until the new
cluster's counter passed the old one's. A private cluster stands in for the restore's target.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

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

#: the source cluster's transaction ids are made to exceed this before its events are written: a new
#: cluster, after initdb and the restore, is far below it
OLD_CLUSTER_XID = 20_000


@pytest.fixture
def target() -> Iterator[PostgresCluster]:
    root = Path(tempfile.mkdtemp(prefix="dermq-restored-"))
    root.chmod(0o755)  # the postgres user must reach its cluster folder inside
    cluster = PostgresCluster(root / "pg")
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        dispose_engines()
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


def record(settings: Settings, n: int, label: str) -> list[int]:
    ids = []
    for i in range(n):
        with session_scope(settings) as session:
            ids.append(
                audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM, detail={label: i})
            )
    return ids


def burn_transaction_ids(url: str, beyond: int) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            while int(connection.scalar(text("SELECT pg_current_xact_id()::text"))) < beyond:
                pass
    finally:
        engine.dispose()


def test_a_database_restored_into_another_cluster_goes_on_sealing(
    settings: Settings, target: PostgresCluster, tmp_path: Path
) -> None:
    source_url = make_url(settings.database_url).set(database=f"{support.TEST_DATABASE}_dumped")
    source = settings.model_copy(update={"database_url": source_url.render_as_string(False)})
    support.recreate_database(source.database_url, template=f"{settings.database_url}_template")
    try:
        burn_transaction_ids(source.database_url, OLD_CLUSTER_XID)
        sealed_before = record(source, 3, "before")
        support.seal_all(source)
        unsealed_in_dump = record(source, 2, "in-flight")  # committed, not yet sealed when the dump ran
        dump = tmp_path / "dermq.dump"
        subprocess.run(
            ["pg_dump", "-Fc", "-f", str(dump), "-h", "127.0.0.1", "-U", "postgres", source_url.database or ""],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        dispose_engines()
        support.drop_database(source.database_url)

    subprocess.run(
        ["createdb", "-h", "127.0.0.1", "-p", str(target.port), "-U", "postgres", "dermq"], check=True, timeout=60
    )
    subprocess.run(
        [
            "pg_restore",
            "--no-owner",
            "-h",
            "127.0.0.1",
            "-p",
            str(target.port),
            "-U",
            "postgres",
            "-d",
            "dermq",
            str(dump),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    restored = settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{target.port}/dermq",
            "audit_witness_file": tmp_path / "witness.log",
        }
    )
    with session_scope(restored) as session:
        assert int(session.scalar(text("SELECT pg_current_xact_id()::text"))) < OLD_CLUSTER_XID  # a younger cluster
    after_restore = record(restored, 2, "after")
    support.seal_all(restored, timeout=30)

    with session_scope(restored) as session:
        order = session.scalars(text("SELECT event_id FROM audit_leaves ORDER BY seq")).all()
        assert order[-7:] == [*sealed_before, *unsealed_in_dump, *after_restore]
        assert audit_log.oldest_unsealed(session) is None
        keys = load_signing_keys(restored)
        assert audit_verify.verify_log(session, verifiers=keys.verifiers).ok
    more = record(restored, 1, "later")  # and on, in the new cluster's own order
    support.seal_all(restored, timeout=30)
    with session_scope(restored) as session:
        assert session.scalars(text("SELECT event_id FROM audit_leaves ORDER BY seq")).all()[-1] == more[0]
