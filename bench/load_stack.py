"""The own stack of :mod:`bench.load` (scratch database, API, worker, sweep and sealer) and what the
database says after a run: the tally of accepted cases, the API's intake times, the sealing lag."""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tests import processes, support

if TYPE_CHECKING:
    from core.config import Settings

DATABASE = "dermq_bench_load"
REDIS_DB = 10


def layout_env(args: argparse.Namespace) -> dict[str, str]:
    """The process layout of the stack ``bench.load`` starts, as DERMQ_* settings (set, never inherited)."""
    return {
        "DERMQ_API_PROCESSES": str(args.api_processes),
        "DERMQ_WORKER_CONCURRENCY": str(args.concurrency),
        "DERMQ_WORKER_THREADS": str(args.worker_threads),
    }


def start_stack(
    args: argparse.Namespace,
    workdir: Path,
    launched: list[processes.Process],
    stopped: threading.Event,
    *,
    database: str = DATABASE,
    redis_db: int = REDIS_DB,
    **overrides: str,
) -> tuple[str, list[str], str, Path]:
    """Scratch ``database`` (recreated), Redis database ``redis_db`` (flushed), the API and a worker
    (appended to ``launched`` as they start, so that the caller stops them whatever happens), the
    sweep and the sealer until ``stopped``; ``overrides`` are more DERMQ_* settings. Returns (API URL,
    a clinic key per portal, database URL, the API's log)."""
    import redis

    port = support.free_port()
    env = support.test_env(
        workdir,
        DERMQ_DATABASE_URL=f"postgresql+psycopg2:///{database}",
        DERMQ_REDIS_URL=f"redis://127.0.0.1:6379/{redis_db}",
        DERMQ_API_PORT=str(port),
        DERMQ_LOG_LEVEL="INFO",  # the worker's "ready." line, and the API's access log (server-side timings)
        DERMQ_WORKER_METRICS_PORT="0",
        **layout_env(args),
        **overrides,
    )
    settings, _, token = support.prepare_stack(env, f"bench-load-{uuid.uuid4().hex[:6]}")
    tokens = [token, *clinic_keys(settings, args.clients - 1)]
    base = f"http://127.0.0.1:{port}"
    api = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, workdir / "api.log")
    launched.append(api)
    support.wait_for(lambda: processes.api_up(base) or not api.alive(), timeout=60, what="the API")
    if not api.alive():
        raise RuntimeError(api.output()[-2000:])
    launched.append(processes.start_worker(env, workdir / "worker.log", concurrency=args.concurrency))

    def sweep_every_5_s() -> None:
        from core.publisher import make_publisher
        from worker.tasks import sweep_once

        publisher = make_publisher(settings)
        broker = redis.Redis.from_url(settings.redis_url)
        while not stopped.wait(5):
            try:
                sweep_once(settings, publisher, broker)
            except Exception as exc:
                print(f"sweep failed: {type(exc).__name__}")

    def seal_every_second() -> None:
        from core import audit_commands, audit_log
        from core.checkpoint import load_signing_keys

        audit_commands.ensure_signing_key(settings)
        keys = load_signing_keys(settings)
        while not stopped.wait(1):
            try:
                audit_log.seal_once(settings, keys)
            except Exception as exc:
                print(f"sealing failed: {type(exc).__name__}")

    threading.Thread(target=sweep_every_5_s, daemon=True).start()
    threading.Thread(target=seal_every_second, daemon=True).start()
    return base, tokens, settings.database_url, api.log


def clinic_keys(settings: Settings, count: int) -> list[str]:
    """A key of a clinic of its own for each of ``count`` more portals."""
    from core import clinics, keys
    from core.crypto import load_keyring
    from core.db import session_scope
    from core.models import Role

    keyring, tokens = load_keyring(settings), []
    with session_scope(settings) as session:
        for _ in range(count):
            clinic = clinics.create_clinic(session, f"bench-load-{uuid.uuid4().hex[:8]}")
            tokens.append(keys.create_key(session, keyring, role=Role.CLINIC, clinic_id=clinic.id)[1])
    return tokens


def sealing_lag(database_url: str, since: datetime) -> list[float]:
    """Seconds from each audit event of the run to the first signed checkpoint covering it (unsealed: inf).

    A checkpoint's ``signed_at`` is what its signed note carries: the signing time, to the millisecond
    (checkpoints signed before that had whole seconds, which this would undercount by up to one)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as connection:
        lags = connection.execute(
            text(
                "SELECT extract(epoch FROM (c.signed_at - e.occurred_at)) FROM audit_events e "
                "LEFT JOIN audit_leaves l ON l.event_id = e.id "
                "LEFT JOIN LATERAL (SELECT signed_at FROM audit_checkpoints WHERE size > l.seq "
                "ORDER BY size LIMIT 1) c ON true WHERE e.occurred_at >= :since"
            ),
            {"since": since},
        ).scalars()
        found = [float(lag) if lag is not None else float("inf") for lag in lags]
    engine.dispose()
    return found


def server_intake(api_log: Path, since: float) -> list[float]:
    """Seconds the API spent on each answered submission (its access log), from ``since`` (epoch) on."""
    durations = []
    for line in api_log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (
            entry.get("route") == "/v1/cases"
            and entry.get("method") == "POST"
            and entry.get("status_code") in (200, 202)
        ) and datetime.fromisoformat(entry["ts"]).timestamp() >= since:
            durations.append(entry["duration_ms"] / 1000)
    return durations


def database_tally(database_url: str, accepted: list[str]) -> dict[str, object]:
    """What Postgres says about the accepted cases (the truth), and any case nobody was told about."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    ids = list(dict.fromkeys(accepted))
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT c.id::text, c.clinic_id::text, c.status, c.created_at, c.finished_at, "
                "(SELECT count(*) FROM results r WHERE r.case_id = c.id) AS results "
                "FROM cases c WHERE c.id::text = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
        clinics = {row.clinic_id for row in rows}
        in_clinics = connection.scalar(
            text("SELECT count(*) FROM cases WHERE clinic_id::text = ANY(:clinics) AND created_at >= :since"),
            {"clinics": list(clinics), "since": min((r.created_at for r in rows), default=None)},
        )
    engine.dispose()
    terminal = [r for r in rows if r.status in ("succeeded", "failed")]
    return {
        "found": len(rows),
        "terminal": len(terminal),
        "failed": sum(r.status == "failed" for r in rows),
        "extra_cases": (in_clinics or 0) - len(rows),
        "multi_results": sum(r.results > 1 for r in rows),
        "server_latency": [(r.finished_at - r.created_at).total_seconds() for r in terminal],
        "span": (
            (max(r.finished_at for r in terminal) - min(r.created_at for r in rows)).total_seconds()
            if terminal
            else float("nan")
        ),
    }
