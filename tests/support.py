"""Helpers for integration tests: the test database, settings shared with subprocesses, ports,
polling, multipart bodies and stored results (the processes they start and watch: tests.processes)."""

from __future__ import annotations

import itertools
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
#: The `dermq` command of these sources (the console script runs whichever copy is installed).
DERMQ = [sys.executable, "-m", "cli"]
#: pytest-xdist's name for this process when the suite runs in parallel (``gw0``, ``gw1``, ...: ``make
#: test``), else "" (``make test TEST_WORKERS=1``, or one module run alone). Each parallel worker gets
#: databases and a Redis database of its own, so that no two of them see, flush or drop each other's state.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
#: Overridable so that two test runs on one machine never share (and drop) each other's databases.
TEST_DATABASE = os.environ.get("DERMQ_TEST_DATABASE", "dermq_test") + (f"_{XDIST_WORKER}" if XDIST_WORKER else "")
#: Per parallel worker, the system Redis databases its stacks take: the shared test stack's, `make
#: run`'s (tests/test_make_run.py) and the production-mode services' (tests/deploy). bench/ takes
#: 9, 10, 12 and 13, `make run` itself 0, and tests/api/test_portal_following.py 1 (where no worker listens).
_REDIS_DBS = ((14, 13, 15), (11, 7, 6), (5, 4, 3))
_SLOT = int(XDIST_WORKER.removeprefix("gw") or 0)
if len(_REDIS_DBS) <= _SLOT:
    raise RuntimeError(f"{XDIST_WORKER}: at most {len(_REDIS_DBS)} parallel test workers")
TEST_REDIS_DB, MAKE_RUN_REDIS_DB, PRODUCTION_REDIS_DB = _REDIS_DBS[_SLOT]


#: The ports :func:`free_port` hands out: below Linux's ephemeral range (32768 and up), so that no
#: outgoing connection takes one between the test choosing it and its server binding it, and a block
#: of its own per parallel worker, so that two workers never choose the same one. Each process starts
#: at a random place in its block and goes round it (a subprocess of the same worker has its own start).
_PORTS_FROM, _PORT_BLOCK = 20000, 3000
_ports = itertools.count(random.randrange(_PORT_BLOCK))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server the test is about to start."""
    start = _PORTS_FROM + _SLOT * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = start + next(_ports) % _PORT_BLOCK
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + _PORT_BLOCK - 1}")


def test_env(workdir: Path, **overrides: str) -> dict[str, str]:
    """DERMQ_* variables for the test stack; subprocesses get the same ones."""
    env = {
        "DERMQ_ENVIRONMENT": "test",
        # the tests' callback receivers listen on 127.0.0.1
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "true",
        "DERMQ_DATABASE_URL": f"postgresql+psycopg2:///{TEST_DATABASE}",
        "DERMQ_REDIS_URL": f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        "DERMQ_KEY_FILE": str(workdir / "keys.json"),
        "DERMQ_AUDIT_WITNESS_FILE": str(workdir / "audit-witness.log"),
        "DERMQ_LOG_LEVEL": "INFO",
        "DERMQ_LOG_JSON": "true",
        "DERMQ_TASK_SOFT_TIME_LIMIT": "60",
        "DERMQ_TASK_TIME_LIMIT": "90",
        "DERMQ_BROKER_VISIBILITY_TIMEOUT": "300",
        # Generous: tests share one address and deliberately fail authentication.
        "DERMQ_RATE_LIMIT_FAILED_AUTH_PER_MINUTE": "10000",
        "DERMQ_RATE_LIMIT_SUBMISSIONS_PER_MINUTE": "10000",
        "DERMQ_RATE_LIMIT_READS_PER_MINUTE": "100000",
        # Tests send bursts from one clinic on purpose; tests/api/test_memory_bombs.py sets its own bound.
        "DERMQ_MAX_CONCURRENT_UPLOADS_PER_CLINIC": "64",
        # Metrics listeners on spare ports (0 turns them off); fixtures that scrape set them.
        "DERMQ_METRICS_PORT": "0",
        "DERMQ_WORKER_METRICS_PORT": str(free_port()),
    }
    env.update(overrides)
    return env


def drop_database(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": parsed.database},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}"'))
    admin.dispose()


def recreate_database(url: str, *, template: str | None = None) -> None:
    """Drop and create the database of ``url``: empty, or a copy of the database ``template`` (which
    nothing may be connected to meanwhile)."""
    drop_database(url)
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
        connection.execute(text(f'CREATE DATABASE "{parsed.database}"{copy}'))
    admin.dispose()


class PreparedStack(NamedTuple):
    settings: Any  # core.config.Settings
    clinic_id: uuid.UUID
    token: str  # the clinic's API key


def prepare_stack(env: dict[str, str], clinic_name: str) -> PreparedStack:
    """For a stack started with ``env``: a new key file, a fresh migrated database, an empty Redis
    database, and one clinic with an API key."""
    import redis

    from core import clinics, keys
    from core.crypto import Keyring, load_keyring, write_key_file
    from core.db import session_scope
    from core.models import Role

    write_key_file(Path(env["DERMQ_KEY_FILE"]), Keyring.generate())
    recreate_database(env["DERMQ_DATABASE_URL"])
    migrate(env["DERMQ_DATABASE_URL"])
    redis.Redis.from_url(env["DERMQ_REDIS_URL"]).flushdb()
    settings = settings_for(env)
    if settings.period_key_folder is not None:  # as `dermq keys init` (or a deployment's volume) makes it
        settings.period_key_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with session_scope(settings) as session:
        clinic = clinics.create_clinic(session, clinic_name)
        _, token = keys.create_key(session, load_keyring(settings), role=Role.CLINIC, clinic_id=clinic.id)
        return PreparedStack(settings, clinic.id, token)


def self_signed_certificate(cert: Path, key: Path) -> None:
    """A throwaway certificate for ``localhost`` and its private key (mode 0600), as PEM files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(private, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert.write_bytes(certificate.public_bytes(pem))
    key.write_bytes(private.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key.chmod(0o600)


def migrate(url: str) -> None:
    from alembic import command

    from cli.db import alembic_config

    command.upgrade(alembic_config(url), "head")


@contextmanager
def scratch_database(url: str, name: str) -> Iterator[tuple[Any, Any]]:
    """An empty database ``<the test database>_<name>`` on the server of ``url``, for a migration
    test: its Alembic config and an engine on it; dropped afterwards."""
    from cli.db import alembic_config

    scratch = make_url(url).set(database=f"{TEST_DATABASE}_{name}")
    plain = scratch.render_as_string(hide_password=False)
    recreate_database(plain)
    engine = create_engine(scratch)
    try:
        yield alembic_config(plain), engine
    finally:
        engine.dispose()
        drop_database(plain)


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 60, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def multipart(
    image: bytes | None = None,
    *,
    filename: str = "lesion.jpg",
    content_type: str = "image/jpeg",
    fields: dict[str, str] | None = None,
    boundary: str = "dermqtestboundary",
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type header, built by hand for hostile variants."""
    parts = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    if image is not None:
        header = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        if content_type:
            header += f"Content-Type: {content_type}\r\n"
        parts.append(header.encode() + b"\r\n" + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def settings_for(env: Mapping[str, str]) -> Settings:
    """The Settings a process started with ``env`` (over this process's environment) reads, with the
    secret files of its ``DERMQ_SECRETS_DIR`` (its Redis URL, say)."""
    from core.config import get_settings

    with environment(env):
        return get_settings.__wrapped__()


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def diagnosis_values(*, label: str, model_id: str, input_stats: dict[str, float], **fields: Any) -> dict[str, Any]:
    """The values of a stored diagnosis with neutral figures, as drift monitoring reads it; ``fields``
    override (``created_at``, say)."""
    return {
        "label": label,
        "probabilities": {},
        "confidence": 0.5,
        "uncertainty": 0.5,
        "referral": False,
        "referral_reasons": [],
        "gradcam_status": "ok",
        "model_id": model_id,
        "weights_sha256": "0" * 64,
        "device": "cpu",
        "timings": {},
        "input_stats": input_stats,
        **fields,
    }


def diagnosis_row(
    case_id: uuid.UUID, *, label: str, model_id: str, input_stats: dict[str, float], **fields: Any
) -> Any:
    """A diagnosis stored as a release before migration 0009 did: findings in plain columns."""
    from core.models import Result

    return Result(
        case_id=case_id, **diagnosis_values(label=label, model_id=model_id, input_stats=input_stats, **fields)
    )


def store_results(session: Any, keyring: Any, items: list[tuple[uuid.UUID, dict[str, Any]]]) -> None:
    """Store results as the worker does: the rows plain, the findings sealed under each case's period
    key (core.results, core.period_shredding)."""
    from sqlalchemy import select

    from core import cases, period_shredding, results
    from core.models import Case

    created = dict(session.execute(select(Case.id, Case.created_at).where(Case.id.in_([i for i, _ in items]))).all())
    wraps = period_shredding.wrapping_keys(session, keyring, created.values())
    rows, sealed = results.new_results(keyring, [(i, values, wraps[created[i]]) for i, values in items])
    results.insert_rows(session, rows)
    cases.insert_blobs(session, sealed)


def seal_all(settings: Any, timeout: float = 60) -> Any:
    """Run the audit sealer until every event committed before this call is in the log.

    The sealer seals an event once no older transaction in the whole cluster is still running (other
    test runs share it), so a single run may seal nothing yet: repeat until the log has caught up."""
    from core import audit_log
    from core.checkpoint import load_signing_keys
    from core.db import session_scope

    keys = load_signing_keys(settings)
    with session_scope(settings) as session:
        target = session.scalar(text("SELECT count(*) FROM audit_events"))
    deadline = time.monotonic() + timeout
    while True:
        result = audit_log.seal_once(settings, keys)
        if result is not None and result.size >= target:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"the sealer did not seal {target} events within {timeout} s")
        time.sleep(0.1)


def publish_classify(app: Any, case_id: uuid.UUID, priority: str = "routine") -> bool:
    """Send ``classify(case_id)`` now, outside any transaction (production code enqueues on its Session)."""
    from core.publisher import classify_task, send

    return send(app, classify_task(case_id, priority))


@contextmanager
def statements_sent(settings: Any) -> Iterator[list[str]]:
    """The SQL statements this process sends to the database of ``settings`` while the block runs, on
    any engine (an app built before :func:`core.db.dispose_engines` keeps the engine it was given),
    whitespace collapsed (the list fills as they go)."""
    from sqlalchemy import Engine, event

    database = make_url(settings.database_url).database
    sent: list[str] = []

    def record(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if conn.engine.url.database == database:
            sent.append(" ".join(statement.split()))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@contextmanager
def commit_settings(counted: Callable[[], bool]) -> Iterator[list[str]]:
    """The ``synchronous_commit`` that each commit in this process runs with while the block runs
    (``on``: it waits for the disk; ``off``: not), for the commits made where ``counted()`` is true
    (a test's own thread: other tests' work may commit in this process meanwhile)."""
    from sqlalchemy import Engine, event

    seen: list[str] = []

    def committed(connection: Any) -> None:
        if counted():
            seen.append(connection.exec_driver_sql("SHOW synchronous_commit").scalar_one())

    event.listen(Engine, "commit", committed)
    try:
        yield seen
    finally:
        event.remove(Engine, "commit", committed)


@contextmanager
def connection_lost_on(settings: Any, table: str, statement: str = "INSERT") -> Iterator[None]:
    """While the block runs, a connection that runs ``statement`` (rows or none) on ``table`` of the database
    of ``settings`` is really lost: a trigger terminates its own backend, so the client gets the error a
    database crash or a network cut gives (``OperationalError``, the connection invalidated). Only for a
    database of the test's own: every writer of ``table`` there loses its connection."""
    engine = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    name = f"dermq_test_lose_{statement.lower()}_{table}"
    try:
        with engine.connect() as connection:
            connection.execute(
                text(
                    f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"
                )
            )
            connection.execute(text(f"CREATE TRIGGER {name} BEFORE {statement} ON {table} EXECUTE FUNCTION {name}()"))
        yield
    finally:
        with engine.connect() as connection:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {table}"))
            connection.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
        engine.dispose()
