"""Time to verify the audit trail: the Merkle log against signed checkpoints vs the old hash chain.

    python -m bench.audit_verify [--events 20000] [--database dermq_bench_audit]

Builds a throw-away database (dropped at the end) with ``--events`` audit rows that carry both the
old chain hashes and, once sealed, Merkle leaves, then in the same run times:

- ``chain``: today's (pre-0005) ``verify_chain``: every row read through the ORM, SHA-256 chained;
- ``merkle``: :func:`core.audit_verify.walk`: every event's leaf recomputed from its row, roots
  recomputed with a compact range and compared with every signed checkpoint (signatures checked);
- the sealer's throughput (events sealed per second, batches of 20 000, one checkpoint each).

It prints events per second and the extrapolation to 1 million events (both walks are linear).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cli.db import alembic_config
from core import audit_log, audit_verify, checkpoint
from core.audit import canonical
from core.audit_chain import GENESIS, verify_chain
from core.config import get_settings
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--database", default="dermq_bench_audit")
    args = parser.parse_args(argv)

    base = get_settings()
    url = make_url(base.database_url).set(database=args.database).render_as_string(False)
    settings = base.model_copy(update={"database_url": url, "audit_witness_file": None})
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
            sealed = audit_log.seal_once(settings, keys)
            seal_s += time.perf_counter() - t0
            size = sealed.size if sealed is not None else size
            if size < args.events:
                time.sleep(0.05)

        with session_scope(settings) as session:
            t0 = time.perf_counter()
            chain = verify_chain(session)
            chain_s = time.perf_counter() - t0
        with session_scope(settings) as session:
            t0 = time.perf_counter()
            roots, problem = audit_verify.trusted_roots(session, keys.verifiers)
            report = audit_verify.walk(session, roots)
            merkle_s = time.perf_counter() - t0
        assert chain.ok and chain.checked == args.events, chain
        assert report.ok and report.checked == args.events and problem is None, report
    finally:
        dispose_engines()
        _drop(url)

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
