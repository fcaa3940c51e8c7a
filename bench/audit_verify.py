"""Time to verify the audit trail: the Merkle log against signed checkpoints vs the old hash chain.

    python -m bench.audit_verify [--events 20000] [--seal-every 20000] [--database dermq_bench_audit]

Builds a throw-away database (dropped at the end) with ``--events`` audit rows that carry both the
old chain hashes and, once sealed, Merkle leaves, then in the same run times:

- ``chain``: today's (pre-0005) ``verify_chain``: every row read through the ORM, SHA-256 chained;
- ``merkle``: the walk ``dermq audit verify`` runs (:func:`core.audit_verify.verify_log`, without the
  old chain, timed apart as the baseline): every event's leaf recomputed from its row, roots
  recomputed with a compact range and compared with every signed checkpoint, stored and in the
  witness file (signatures checked);
- the sealer's throughput (events sealed per second, a checkpoint each ``--seal-every`` events,
  witnessed in a scratch file).

It prints events per second, the extrapolation to 1 million events (both walks are linear) and the
largest amount of memory the Merkle verification held (Python's allocations, measured in a second,
traced run). In production the sealer makes a checkpoint about every second while events come in,
a few events each: ``--seal-every 10`` is closer to that than the default's 20 000.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cli.db import alembic_config
from core import audit_log, audit_verify, checkpoint
from core.audit import canonical
from core.audit_chain import GENESIS, verify_chain
from core.config import Settings, get_settings
from core.db import dispose_engines, session_scope


def _recreate(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


def _drop(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
    admin.dispose()


def _fill(url: str, n: int) -> None:
    """n chained rows, written the way the old record() did (ids 1..n), in batches."""
    import hashlib

    from psycopg2.extras import execute_values

    engine = create_engine(url)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    prev = GENESIS
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        batch = []
        for i in range(1, n + 1):
            when = start + timedelta(milliseconds=i)
            detail = {"count": i % 50, "filters": {"clinic": "c"}}
            content = {
                "id": i,
                "occurred_at": when.isoformat(timespec="microseconds"),
                "action": "case.read",
                "outcome": "success",
                "actor_type": "api_key",
                "actor_key_id": "6f1c2b0e-8a57-4d51-9a4c-2f1d7f0e9b11",
                "actor_role": "clinic",
                "clinic_id": "0b7e5c1a-3c1d-4e0f-8a61-5d2c9b7a4e21",
                "source_ip": "10.0.0.7",
                "user_agent": "portal/2.3",
                "request_id": f"req-{i}",
                "entity_type": "case",
                "entity_id": "3f2a9c1e-7b4d-4e8f-9a0b-1c2d3e4f5a6b",
                "detail": detail,
            }
            digest = hashlib.sha256(f"{prev}\n{canonical(content)}".encode()).hexdigest()
            batch.append((i, when, *list(content.values())[2:13], json.dumps(detail), prev, digest))
            prev = digest
            if len(batch) == 5000 or i == n:
                execute_values(
                    cursor,
                    "INSERT INTO audit_events (id, occurred_at, action, outcome, actor_type, actor_key_id, actor_role,"
                    " clinic_id, source_ip, user_agent, request_id, entity_type, entity_id, detail, prev_hash, hash)"
                    " VALUES %s",
                    batch,
                )
                raw.commit()
                batch = []
        cursor.execute("SELECT setval(pg_get_serial_sequence('audit_events', 'id'), %s)", (n,))
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def _seal(settings: Settings, keys: checkpoint.SigningKeys, every: int) -> int | None:
    """Seal what is committed, a signed checkpoint each ``every`` events, as the sealer does, but
    :data:`SEALS_A_TRANSACTION` checkpoints a transaction and an append to the witness file (a
    production sealer commits and fsyncs each, about 20 ms a checkpoint: a densely checkpointed log
    would take many minutes to build). Returns the tree's size, or None when another sealer held the
    lock."""
    assert settings.audit_witness_file is not None
    size = None
    while True:
        notes, step = [], None
        with session_scope(settings) as session:
            for _ in range(SEALS_A_TRANSACTION):
                step = audit_log.seal(session, keys, settings.audit_log_origin, limit=every)
                if step is not None and step.note is not None:
                    notes.append(step.note)
                if step is None or step.sealed < every:
                    break
        with settings.audit_witness_file.open("a", encoding="utf-8") as witness:
            witness.write("".join(f"{note}\n" for note in notes))
        if step is None:
            return size
        size = step.size
        if step.sealed < every:
            return size


#: checkpoints :func:`_seal` signs in one transaction
SEALS_A_TRANSACTION = 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seal-every", type=int, default=audit_log.BATCH, help="events per signed checkpoint")
    parser.add_argument("--database", default="dermq_bench_audit")
    args = parser.parse_args(argv)

    base = get_settings()
    url = make_url(base.database_url).set(database=args.database).render_as_string(False)
    scratch = Path(tempfile.mkdtemp(prefix="dermq-bench-audit-"))
    settings = base.model_copy(update={"database_url": url, "audit_witness_file": scratch / "witness.log"})
    keys = checkpoint.generate(settings.audit_log_origin)
    _recreate(url)
    try:
        from alembic import command

        # the old chain's rows are written where they were: before migration 0014's insert guard, which
        # refuses a chain hash, an id of the writer's choosing and (0021) any time but the database's
        command.upgrade(alembic_config(url), "0013")
        t0 = time.perf_counter()
        _fill(url, args.events)
        fill_s = time.perf_counter() - t0
        command.upgrade(alembic_config(url), "head")

        # The sealer waits for every older transaction in the cluster (other sessions may hold one):
        # repeat until everything is sealed, timing only the runs themselves.
        seal_s, size = 0.0, 0
        while size < args.events:
            t0 = time.perf_counter()
            size = _seal(settings, keys, args.seal_every) or size
            seal_s += time.perf_counter() - t0
            if size < args.events:
                time.sleep(0.05)

        with session_scope(settings) as session:
            t0 = time.perf_counter()
            chain = verify_chain(session)
            chain_s = time.perf_counter() - t0

        def merkle() -> audit_verify.LogReport:
            with session_scope(settings) as session:
                return audit_verify.verify_log(  # the events against the checkpoints: not the old chain
                    session, verifiers=keys.verifiers, witness=settings.audit_witness_file, whole=False
                )

        t0 = time.perf_counter()
        report = merkle()
        merkle_s = time.perf_counter() - t0
        tracemalloc.start()
        merkle()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert chain.ok and chain.checked == args.events, chain
        assert report.ok and report.checked == args.events, report
    finally:
        dispose_engines()
        _drop(url)
        shutil.rmtree(scratch, ignore_errors=True)

    n = args.events
    print(f"audit verification, {n} events (rows filled in {fill_s:.1f} s)")
    print(f"{'':28}{'seconds':>10}{'events/s':>12}{'1e5 events':>12}{'1e6 events':>12}")
    for name, seconds in (
        ("old hash chain (baseline)", chain_s),
        ("merkle log vs checkpoints", merkle_s),
        ("sealing (one-off)", seal_s),
    ):
        rate = n / seconds
        print(f"{name:<28}{seconds:>10.2f}{rate:>12.0f}{1e5 / rate:>11.1f}s{1e6 / rate:>11.1f}s")
    print(f"merkle / chain time: {merkle_s / chain_s:.2f}; checkpoints checked: {report.checkpoints}")
    print(
        f"memory the merkle verification held at its peak: {peak / 1e6:.1f} MB "
        f"({report.checkpoints} checkpoints, one each {args.seal_every} events, stored and witnessed)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
