"""Redis requires a password in both deployments, and every process that talks to Redis reads the URL
that holds it from a secret file: compose's Redis takes its ACL users from a secret file (never from
a command line, where ``ps`` shows a password), the services' user without Redis's dangerous
commands, its health check authenticates as the operators' user, Kubernetes' pods mount the URL from
the Secret, KEDA reads it through a TriggerAuthentication. Before, Redis asked for no password and
any container on compose's ``backend`` network (Prometheus, Postgres), or any pod let through the
NetworkPolicies, could queue tasks, shut every worker down or clear the rate limits; then, with one
password for everything, whoever held the services' URL could also rewrite Redis's configuration
(``CONFIG SET dir``: write files as Redis's user), flush it whole, list its keys or stop it."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.config import Settings
from tests.deploy import manifests as m
from tests.deploy.compose_redis import ADMIN_USER, SERVICES_USER, compose_redis, make_guide_files, redis_include
from tests.faults.servers import RedisServer

#: redis-server and redis-cli options that would put a password on a command line (redis-cli's
#: --user takes a name; redis-server's --user an ACL rule, which may hold `>password` anywhere)
PASSWORD_OPTIONS = re.compile(r"(?:^|\s)(?:-a|--pass|--requirepass|requirepass)(?:\s|=|$)|--user\s+\S+\s+[^;|]*>")


def _compose_redis_clients() -> dict[str, dict]:  # type: ignore[type-arg]
    services = m.compose_services()
    return {
        name: service
        for name, service in services.items()
        if m.compose_image_kind(service) and m.process_of(m.compose_command(service) or []) in m.REDIS_CLIENTS
    }


def test_every_redis_client_in_compose_reads_the_url_with_its_password_from_a_secret_file() -> None:
    clients = _compose_redis_clients()
    assert set(clients) == {"api", "worker", "worker-cpu", "worker-callbacks", "beat", "flower"}
    for name, service in clients.items():
        assert m.REDIS_URL in m.compose_secret_targets(service), f"{name} talks to Redis without its password"
        assert "DERMQ_REDIS_URL" not in m.compose_environment(service), f"{name}: a variable wins over the file"
    assert m.compose()["secrets"][m.REDIS_URL]["file"] == f"./deploy/secrets/{m.REDIS_URL}"
    # the migration job never opens Redis: it mounts no Redis password (and its default URL is local)
    assert m.REDIS_URL not in m.compose_secret_targets(m.compose_services()["migrate"])


def test_compose_redis_requires_the_password_from_a_secret_file_never_from_a_command_line() -> None:
    service = m.compose_services()["redis"]
    included = redis_include(service)
    assert included.removeprefix("/run/secrets/") in m.compose_secret_targets(service), f"{included} is not mounted"
    health = " ".join(service["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in health and included in health, "the health check must authenticate, from the file"
    for name, other in m.compose_services().items():
        words = [*(m.compose_command(other) or []), *(other.get("healthcheck", {}).get("test") or [])]
        assert not PASSWORD_OPTIONS.search(" ".join(map(str, words))), f"{name}: a password on a command line"
        assert not any("REDIS_PASSWORD" in key for key in m.compose_environment(other)), name


@pytest.mark.parametrize(
    ("command", "found"),
    [
        ("redis-server --user dermq on >pw ~* +@all", True),
        ("redis-server --user dermq >pw on ~* +@all", True),  # an ACL rule in any order
        ("redis-server --requirepass pw", True),
        ("redis-cli -a pw ping", True),
        ("redis-cli --user admin ping; else redis-cli ping; fi | grep -q PONG", False),  # a name, no password
        ("redis-server --include /run/secrets/redis-auth.conf --appendonly yes", False),
    ],
)
def test_the_command_line_check_would_catch_a_password(command: str, found: bool) -> None:
    assert bool(PASSWORD_OPTIONS.search(command)) is found


def test_every_redis_client_pod_mounts_the_url_with_its_password() -> None:
    for w in m.workloads():
        (container,) = w.containers
        files = m.mounted_secret_files(w.pod, container)
        env = m.container_environment(container)
        assert "DERMQ_REDIS_URL" not in env, f"{w.name}: a variable wins over the file"
        mounted = files.get(f"{env['DERMQ_SECRETS_DIR']}/{m.REDIS_URL}")
        if w.component in m.REDIS_CLIENTS:
            assert mounted == f"dermq-secrets/{m.REDIS_URL}", f"{w.name} talks to Redis without its password"
        else:
            assert mounted is None, f"{w.name} never opens Redis"
    template = m.k8s_object("Secret", "dermq-secrets")["stringData"][m.REDIS_URL]
    assert "REPLACE_ME" in (urlsplit(template).password or ""), "the template's URL carries a password placeholder"
    assert "REPLACE_ME" in m.k8s_object("Secret", "dermq-redis")["stringData"]["redis-password"]


def test_the_shipped_urls_pass_the_production_refusal_and_an_unprotected_one_does_not() -> None:
    template = m.k8s_object("Secret", "dermq-secrets")["stringData"][m.REDIS_URL]
    real = template.replace("REPLACE_ME_REDIS_PASSWORD", "Pw7k2x9q4m")
    assert Settings(environment="production", redis_url=real).redis_url == real
    assert Settings(environment="production", redis_url=m.PLACEHOLDER_SECRETS[m.REDIS_URL])
    with pytest.raises(ValueError, match="DERMQ_REDIS_URL names no password"):
        Settings(environment="production", redis_url=real.replace(":Pw7k2x9q4m@", ""))


def test_the_guides_files_give_compose_redis_its_users_and_the_services_a_user_without_dangerous_commands(
    tmp_path: Path,
) -> None:
    # The secrets guide's commands, run as written; then Redis as compose starts it (its command, the
    # file mounted), its health check as compose runs it, and a service's URL as the guide makes it.
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server, redis-cli and openssl")
    files = make_guide_files(tmp_path / "secrets")
    assert files.config.read_text() == (
        "user default off\n"
        f"user {SERVICES_USER} on >{files.password} ~* &* +@all -@dangerous +info -scan\n"
        f"user {ADMIN_USER} on >{files.admin_password} ~* &* +@all\n"
    )
    assert files.password != files.admin_password
    root = Path(tempfile.mkdtemp(prefix="dermq-redis-compose-"))
    server = compose_redis(files, root)
    server.start()  # the users from the file alone; compose's options last: their --appendonly wins
    try:
        once = Retry(NoBackoff(), 0)  # redis-py would try a refused login again, for seconds
        unauthenticated = redis.Redis(port=server.port, retry=once)
        with pytest.raises(redis.AuthenticationError):
            unauthenticated.ping()
        unauthenticated.close()
        for user, password in (("default", files.password), ("default", files.admin_password), ("dermq", "x")):
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port, username=user, password=password, retry=once).ping()
        health = m.compose_services()["redis"]["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        shell = health[1].replace("$$", "$").replace("/run/secrets", str(files.folder))
        shell = shell.replace("redis-cli", f"redis-cli -p {server.port}")
        assert subprocess.run(["sh", "-c", shell], check=False, timeout=30).returncode == 0, "unhealthy"

        url = (files.folder / m.REDIS_URL).read_text()
        assert urlsplit(url).hostname == "redis"
        assert (urlsplit(url).username, urlsplit(url).password) == (SERVICES_USER, files.password)
        settings = Settings(environment="production", redis_url=url.replace("@redis:6379", f"@127.0.0.1:{server.port}"))
        client = redis.Redis.from_url(settings.redis_url)
        assert client.acl_whoami() == SERVICES_USER
        assert client.info("memory")["used_memory"] > 0, "the API's metrics read INFO memory"
        client.set("dermq-probe", "1")
        # what a leaked URL must not do: write a file as Redis's user, empty Redis, stop it, list its keys
        for forbidden in (
            lambda: client.config_set("dir", "/tmp"),
            lambda: client.config_get("dir"),
            client.flushall,
            client.flushdb,
            lambda: client.keys("*"),
            lambda: client.scan(0),
            lambda: client.execute_command("SHUTDOWN", "NOSAVE"),
            lambda: client.execute_command("MODULE", "LIST"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        assert client.get("dermq-probe") == b"1"
        client.close()

        # the runbook's redis-cli function (its command in the redis container) runs what the runbook
        # asks, as admin
        function = r"redis-cli\(\) \{ docker compose exec -T redis sh -c '(.+?)' redis-cli"
        inner = re.search(function, m.RUNBOOK.read_text())
        assert inner is not None, "the runbook's redis-cli function"
        script = inner.group(1).replace("/run/secrets", str(files.folder))
        script = script.replace("exec redis-cli", f"exec redis-cli -p {server.port}")
        asked = ["CONFIG", "GET", "maxmemory-policy"]
        done = subprocess.run(["sh", "-c", script, "redis-cli", *asked], capture_output=True, text=True, timeout=30)
        assert done.stdout.split() == ["maxmemory-policy", "noeviction"], done.stdout + done.stderr
        files.config.write_text(files.config.read_text().replace(files.admin_password, "another-password"))
        assert subprocess.run(["sh", "-c", shell], check=False, timeout=30).returncode != 0, "a wrong one is healthy"
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)
    # a deployment of the releases before the users (one requirepass line) stays healthy after the upgrade
    old_root = Path(tempfile.mkdtemp(prefix="dermq-redis-requirepass-"))
    files.config.write_text(f"requirepass {files.password}\n")
    old = RedisServer(old_root, password=files.password, options=["--include", str(files.config)])
    old.start()
    try:
        shell = health[1].replace("$$", "$").replace("/run/secrets", str(files.folder))
        shell = shell.replace("redis-cli", f"redis-cli -p {old.port}")
        assert subprocess.run(["sh", "-c", shell], check=False, timeout=30).returncode == 0, "the old file is unhealthy"
        done = subprocess.run(
            ["sh", "-c", script.replace(str(server.port), str(old.port)), "redis-cli", "PING"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.strip() == "PONG", done.stdout + done.stderr
    finally:
        old.destroy()
        shutil.rmtree(old_root, ignore_errors=True)
