"""Database TLS as shipped: every database URL of the deployment connects with ``sslmode=verify-full``
against a CA that its processes mount, and the certificate recipe of deploy/secrets/README.md gives a
Postgres (a real one, private to this module) that a production API reaches that way; the same API
refuses to start with ``sslmode=require``, and a certificate of another CA or for another name is
refused."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from core import db_tls
from tests import processes, support
from tests.deploy import manifests as m
from tests.deploy.test_consistency import deployment_files
from tests.deploy.test_production_start import REDIS_DB, SIGNING_KEY, production_env, write_secrets
from tests.faults.servers import PostgresCluster, postgres_bin

URL = re.compile(r"postgresql(?:\+\w+)?://[^\s'\"`|]+")
MOUNTED_CA = f"/run/secrets/{m.POSTGRES_CA}"
#: URLs in shipped files that never open a connection: the API image's build checks that Alembic
#: finds the migrations with a dummy URL (deploy/Dockerfile.api).
OFFLINE = {("deploy/Dockerfile.api", "postgresql+psycopg2://build-check")}
#: URLs of the development stack on a developer's own machine (its Unix socket), never a deployment's:
#: the README's `make run` beside another stack.
DEVELOPMENT = {("README.md", "postgresql+psycopg2:///dermq_mine")}


def shipped_urls() -> list[tuple[str, str]]:
    """(file, URL) for every database URL in the deployment's files and the docs."""
    files = [*deployment_files(), *sorted((m.ROOT / "docs").glob("*.md")), m.ROOT / "README.md"]
    found = []
    for path in files:
        where = str(path.relative_to(m.ROOT))
        found += [(where, url) for url in URL.findall(path.read_text(errors="replace"))]
    return [item for item in found if item not in OFFLINE | DEVELOPMENT]


def test_every_shipped_database_url_verifies_the_server_against_the_mounted_ca() -> None:
    found = shipped_urls()
    assert {where for where, _ in found} >= {
        "deploy/k8s/secrets/dermq-secrets.template.yaml",
        "deploy/secrets/README.md",
    }, "the search for URLs found none where the deployment keeps them"
    for where, url in found:
        parsed = make_url(url)
        assert parsed.database, f"{where}: {url!r} is not a whole URL (a placeholder with a space?)"
        assert db_tls.network_hosts(url, environ={}), f"{where}: {url} is a local URL in a deployment file"
        assert db_tls.transport_problem(url, environ={}) is None, f"{where}: {url} lacks sslmode=verify-full"
        assert parsed.query.get("sslrootcert") == MOUNTED_CA, f"{where}: {url} must name the CA the pods mount"


def test_every_process_given_a_database_url_also_gets_the_ca() -> None:
    for w in m.workloads():
        for container in w.containers:
            files = m.mounted_secret_files(w.pod, container)
            if any(path.endswith("/dermq_database_url") for path in files):
                assert files.get(MOUNTED_CA) == "dermq-postgres-ca/ca.crt", f"k8s {w.name} lacks {MOUNTED_CA}"
    services = m.compose_services()
    for name, service in services.items():
        targets = m.compose_secret_targets(service)
        if "dermq_database_url" in targets:
            assert m.POSTGRES_CA in targets, f"compose {name} lacks {MOUNTED_CA}"
    # compose's own Postgres serves the certificate the secrets README makes
    postgres = services["postgres"]
    command = " ".join(m.compose_command(postgres) or [])
    assert "ssl=on" in command
    for option in ("ssl_cert_file", "ssl_key_file"):
        path = re.search(rf"{option}=(\S+)", command).group(1)  # type: ignore[union-attr]
        assert path.removeprefix("/run/secrets/") in m.compose_secret_targets(postgres), f"{path} is not mounted"


# --------------------------------------------------------------------------- a real Postgres, the README's certificate


def readme_recipe() -> str:
    """The shell block of deploy/secrets/README.md's "Database TLS" section."""
    section = m.SECRETS_README.read_text().split("## Database TLS", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)  # type: ignore[union-attr]


@dataclass
class TlsPostgres:
    cluster: PostgresCluster
    certs: Path
    database: str
    runtime: str

    def url(self, *, host: str = "postgres", sslmode: str = "verify-full", ca: Path | None = None) -> str:
        """The runtime role's URL by the certificate's name (``hostaddr`` says where it really is)."""
        return (
            f"postgresql+psycopg2://{self.runtime}@{host}:{self.cluster.port}/{self.database}"
            f"?hostaddr=127.0.0.1&sslmode={sslmode}&sslrootcert={ca or self.certs / 'postgres-ca.crt'}"
        )

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.cluster.port}/{self.database}"


@pytest.fixture(scope="module")
def tls_postgres(settings) -> Iterator[TlsPostgres]:  # type: ignore[no-untyped-def]
    """A private Postgres serving the certificate that the README's commands make (run as written),
    with dermq's schema and its owner and runtime roles."""
    from core import db_roles

    if postgres_bin() is None or shutil.which("openssl") is None:
        pytest.skip("needs the PostgreSQL server binaries and openssl")
    root = Path(tempfile.mkdtemp(prefix="dermq-db-tls-"))
    root.chmod(0o755)  # the postgres user must reach its cluster folder inside
    certs = root / "certs"
    certs.mkdir()
    cluster = PostgresCluster(root / "pg")
    try:
        subprocess.run(["sh", "-euc", "umask 077\n" + readme_recipe()], cwd=certs, check=True, capture_output=True)
        assert sorted(p.name for p in certs.iterdir()) == sorted(
            ["postgres-ca.crt", "postgres-ca.key", "postgres-server.crt", "postgres-server.key"]
        )
        cluster.init()
        for name in ("postgres-server.crt", "postgres-server.key"):
            shutil.copyfile(certs / name, cluster.root / name)
            (cluster.root / name).chmod(0o600)
            if cluster.as_root:
                shutil.chown(cluster.root / name, "postgres", "postgres")
        cluster.start(
            "-c ssl=on",
            f"-c ssl_cert_file={cluster.root / 'postgres-server.crt'}",
            f"-c ssl_key_file={cluster.root / 'postgres-server.key'}",
        )
        server = TlsPostgres(cluster, certs, "dermq_tls", "dermq_tls_app")
        support.recreate_database(server.admin_url)
        support.migrate(server.admin_url)
        local = settings.model_copy(update={"database_url": server.admin_url})
        db_roles.set_up_roles(
            local, owner="dermq_tls_owner", runtime=server.runtime, owner_password=None, runtime_password=None
        )
        db_roles.grant(local, server.runtime)
        yield server
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def production_redis() -> Iterator[None]:
    import redis

    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    client.flushdb()
    yield
    client.flushdb()
    client.close()


def _connects(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            return bool(connection.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")))
    except OperationalError:
        return False
    finally:
        engine.dispose()


def _start_api(tmp_path: Path, stack_env: dict[str, str], url: str, ca: Path) -> tuple[processes.Process, str]:
    """dermq-api with the Kubernetes API pod's environment and secret files, and ``url`` as its
    database URL, ``ca`` mounted beside it as postgres-ca.crt."""
    secrets_dir = tmp_path / "secrets"
    modes = {"dermq-keys.json": 0o440, "dermq_database_url": 0o440, m.REDIS_URL: 0o440, SIGNING_KEY: 0o440}
    write_secrets(secrets_dir, stack_env, modes, url, f"redis://127.0.0.1:6379/{REDIS_DB}")
    shutil.copyfile(ca, secrets_dir / m.POSTGRES_CA)
    env = production_env(m.container_environment(m.workload("api").containers[0]), secrets_dir, stack_env)
    assert env["DERMQ_ENVIRONMENT"] == "production"
    server = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    return server, f"http://127.0.0.1:{env['DERMQ_API_PORT']}"


def test_a_production_api_reaches_postgres_over_verify_full(  # type: ignore[no-untyped-def]
    tls_postgres: TlsPostgres, tmp_path: Path, stack_env, production_redis
) -> None:
    url = tls_postgres.url(ca=tmp_path / "secrets" / m.POSTGRES_CA)  # where _start_api mounts it
    server, base = _start_api(tmp_path, stack_env, url, tls_postgres.certs / "postgres-ca.crt")
    try:
        support.wait_for(lambda: processes.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        assert server.alive(), "the API stopped at start-up with a verify-full database URL"
        assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
        admin = create_engine(tls_postgres.admin_url)
        with admin.connect() as connection:
            encrypted = (
                connection.execute(
                    text(
                        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = :runtime"
                    ),
                    {"runtime": tls_postgres.runtime},
                )
                .scalars()
                .all()
            )
        assert encrypted and all(encrypted), "the API's connections must all be TLS"
        admin.dispose()
    finally:
        server.stop()


def test_a_production_api_refuses_to_start_with_sslmode_require(  # type: ignore[no-untyped-def]
    tls_postgres: TlsPostgres, tmp_path: Path, stack_env, production_redis
) -> None:
    weak = tls_postgres.url(sslmode="require")
    assert _connects(weak), "sslmode=require reaches this server: only the start-up check can refuse it"
    server, _ = _start_api(tmp_path, stack_env, weak, tls_postgres.certs / "postgres-ca.crt")
    try:
        assert server.proc.wait(60) != 0
    finally:
        server.stop()


def test_verify_full_refuses_another_cas_certificate_and_another_name(
    tls_postgres: TlsPostgres, tmp_path: Path
) -> None:
    assert _connects(tls_postgres.url())
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-days", "1", "-subj", "/CN=another CA", "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca)),
        ],
        check=True,
        capture_output=True,
    )
    assert not _connects(tls_postgres.url(ca=other_ca)), "a server certificate of another CA was accepted"
    assert not _connects(tls_postgres.url(host="db.example.org")), "a certificate for another name was accepted"
    assert _connects(tls_postgres.url(host="db.example.org", sslmode="verify-ca")), "verify-ca ignores the name"
