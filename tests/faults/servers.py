"""Private PostgreSQL and Redis servers for tests that stop and restart them.

Each runs from a temporary folder on a spare port, so stopping one never disturbs the machine's own
services (127.0.0.1:5432 and :6379) or other tests. ``initdb`` and ``postgres`` refuse to run as
root: as root they run as the ``postgres`` OS user (``runuser``), which owns the cluster's folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests import support

PG_BIN_CANDIDATES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def postgres_bin() -> Path | None:
    for folder in PG_BIN_CANDIDATES:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresCluster:
    """A throwaway cluster: trust authentication on 127.0.0.1, no fsync (tests need no durability
    across a power cut, only across a server stop, which a clean or fast shutdown provides)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = binaries
        self.root = root
        self.data = root / "pgdata"
        self.sockets = root / "pgsock"
        self.log = root / "postgres.log"
        self.port = port or support.free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check, cwd=self.root)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/dermq_faults"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        self.log.touch()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            for path in (self.sockets, self.log):
                shutil.chown(path, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self, *extra: str) -> None:
        """Start the server; ``extra``: more ``-c name=value`` options (TLS, say)."""
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.sockets}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=80",
                "-c shared_buffers=32MB",
                *extra,
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` rolls back open transactions and closes every connection, as an outage would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def server_certificate(folder: Path, names: Sequence[str]) -> None:
    """A CA of its own (``ca.pem``) and a server certificate it signed for ``names`` (host names or IP
    addresses; ``server.pem``, its key ``server.key``, mode 0600) in ``folder``, valid for a day."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        return (
            builder.serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    def subject(item: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(item))
        except ValueError:
            return x509.DNSName(item)

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        valid(x509.CertificateBuilder().subject_name(name("dermq test CA")).issuer_name(name("dermq test CA")))
        .public_key(ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        valid(x509.CertificateBuilder().subject_name(name(names[0])).issuer_name(ca.subject))
        .public_key(server_key.public_key())
        .add_extension(x509.SubjectAlternativeName([subject(item) for item in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    key = folder / "server.key"
    key.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key.chmod(0o600)


class RedisServer:
    """A redis-server without persistence: stopping it loses every message, as a crash would. With a
    ``password`` it requires it (``requirepass``, unless ``options`` include a file that sets it), and
    :attr:`url` holds it, with ``username`` (an ACL user that such a file declares) if given;
    ``options`` are more redis-server options, given after this class's own. With ``tls`` it speaks
    TLS only, on its port, with a certificate for 127.0.0.1 and localhost that a CA of its own
    (``tls/ca.pem`` in ``root``) signed, and :attr:`url` is the ``rediss://`` URL that verifies it."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        username: str = "",
        options: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        self.root = root
        self.port = port or support.free_port()
        self.password, self.username, self.options = password, username, list(options)
        self.tls = root / "tls" if tls else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_with(self.password)

    def url_with(self, password: str | None, *, scheme: str | None = None) -> str:
        """This server's URL with ``password`` (a wrong one, say) in place of its own; with ``scheme``
        (``redis`` to a TLS server, say), that scheme and no TLS parameters."""
        scheme = scheme or ("rediss" if self.tls else "redis")
        user = f"{quote(self.username, safe='')}:{quote(password, safe='')}@" if password else ""
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls / 'ca.pem'}" if self.tls and scheme == "rediss" else ""
        return f"{scheme}://{user}127.0.0.1:{self.port}/0{query}"

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        if not (self.tls / "ca.pem").exists():
            server_certificate(self.tls, ["localhost", "127.0.0.1"])
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(self.tls / "server.pem"), "--tls-key-file", str(self.tls / "server.key")),
            *("--tls-ca-cert-file", str(self.tls / "ca.pem"), "--tls-auth-clients", "no"),
        ]

    def start(self) -> None:
        import redis

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    *self._tls_options(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                    "--protected-mode",
                    "no",
                    *(["--requirepass", self.password] if self.password and "--include" not in self.options else []),
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def own_redis(prefix: str = "dermq-redis-", **options: Any) -> Iterator[RedisServer]:
    """A :class:`RedisServer` (``options``) running in a temporary folder of its own, gone afterwards.
    Skips the test where the machine has no redis-server."""
    import pytest

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisServer(Path(tempfile.mkdtemp(prefix=prefix)), **options)
    server.start()
    try:
        yield server
    finally:
        server.destroy()
