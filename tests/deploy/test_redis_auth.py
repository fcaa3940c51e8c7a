"""Redis requires a password in both deployments, and every process that talks to Redis reads the URL
that holds it from a secret file: compose's Redis takes ``requirepass`` from a secret file (never from
a command line, where ``ps`` shows it), its health check authenticates with it, Kubernetes' pods mount
it from the Secret, KEDA reads it through a TriggerAuthentication. Before, Redis asked for no password
and any container on compose's ``backend`` network (Prometheus, Postgres), or any pod let through the
NetworkPolicies, could queue tasks, shut every worker down or clear the rate limits."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from core.config import Settings
from tests.deploy import manifests as m
from tests.faults.servers import RedisServer

#: redis-server and redis-cli options that would put a password on a command line
PASSWORD_OPTIONS = re.compile(r"(?:^|\s)(?:-a|--pass|--user|--requirepass|requirepass)(?:\s|=|$)")


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


def _redis_include(service: dict) -> str:  # type: ignore[type-arg]
    command = m.compose_command(service) or []
    assert command[:1] == ["redis-server"] and "--include" in command, command
    return command[command.index("--include") + 1]


def test_compose_redis_requires_the_password_from_a_secret_file_never_from_a_command_line() -> None:
    service = m.compose_services()["redis"]
    included = _redis_include(service)
    assert included.removeprefix("/run/secrets/") in m.compose_secret_targets(service), f"{included} is not mounted"
    health = " ".join(service["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in health and included in health, "the health check must authenticate, from the file"
    for name, other in m.compose_services().items():
        words = [*(m.compose_command(other) or []), *(other.get("healthcheck", {}).get("test") or [])]
        assert not PASSWORD_OPTIONS.search(" ".join(map(str, words))), f"{name}: a password on a command line"
        assert not any("REDIS_PASSWORD" in key for key in m.compose_environment(other)), name


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


def _guide_redis_commands() -> str:
    """The lines of deploy/secrets/README.md's "Creating them" block that make Redis's files: the
    password loop and the lines that read redis_password."""
    section = m.SECRETS_README.read_text().split("## Creating them", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)  # type: ignore[union-attr]
    loop = re.search(r"^for f in .*?^done$", block, flags=re.DOTALL | re.MULTILINE).group(0)  # type: ignore[union-attr]
    made = [line for line in block.splitlines() if "redis_password" in line and not line.startswith("for ")]
    assert "redis_password" in loop and len(made) == 2, made
    return "\n".join([loop, *made])


def test_the_guides_files_give_compose_redis_and_the_services_one_password(tmp_path: Path) -> None:
    # The secrets guide's commands, run as written; then Redis as compose starts it (its command, the
    # file mounted), its health check as compose runs it, and a service's URL as the guide makes it.
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server, redis-cli and openssl")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    subprocess.run(["sh", "-euc", "umask 077\n" + _guide_redis_commands()], cwd=secrets_dir, check=True)
    service = m.compose_services()["redis"]
    target = _redis_include(service).removeprefix("/run/secrets/")
    (source,) = [e["source"] for e in service["secrets"] if isinstance(e, dict) and e["target"] == target]
    assert Path(m.compose()["secrets"][source]["file"]).name == target
    password = (secrets_dir / "redis_password").read_text()
    assert (secrets_dir / target).read_text() == f"requirepass {password}\n"

    command = [m.interpolate(part).replace("/run/secrets", str(secrets_dir)) for part in m.compose_command(service)]
    root = Path(tempfile.mkdtemp(prefix="dermq-redis-compose-"))
    server = RedisServer(root, password=password, options=[*command[1:], "--dir", str(root)])
    server.start()  # requirepass from the file alone; compose's options last: their --appendonly wins
    try:
        unauthenticated = redis.Redis(port=server.port)
        with pytest.raises(redis.AuthenticationError):
            unauthenticated.ping()
        unauthenticated.close()
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        shell = health[1].replace("$$", "$").replace("/run/secrets", str(secrets_dir))
        shell = shell.replace("redis-cli", f"redis-cli -p {server.port}")
        assert subprocess.run(["sh", "-c", shell], check=False, timeout=30).returncode == 0, "unhealthy"
        (secrets_dir / target).write_text("requirepass another-password\n")
        assert subprocess.run(["sh", "-c", shell], check=False, timeout=30).returncode != 0, "a wrong one is healthy"

        url = (secrets_dir / m.REDIS_URL).read_text()
        assert urlsplit(url).hostname == "redis" and urlsplit(url).password == password
        settings = Settings(environment="production", redis_url=url.replace("@redis:6379", f"@127.0.0.1:{server.port}"))
        client = redis.Redis.from_url(settings.redis_url)
        assert client.ping()
        assert client.config_get("requirepass") == {"requirepass": password}, "the password came from the file"
        client.close()
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)
