"""The deployment starts as shipped: the API, a worker and the callback worker run in production mode
with the environment and the secret-file modes that the Kubernetes manifests and the compose
instructions give them (no container runtime needed: the same commands, variables and file modes, on
this machine), against a Redis that requires a password, which they read from the secret file
dermq_redis_url as deployed; a wrong one is reported, and never printed. That Redis is compose's, its
users made by the secrets guide's commands: the services log in as the user without Redis's
dangerous commands, and everything they do is allowed to it."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.db import dispose_engines
from tests import processes, support
from tests.conftest import new_tenant
from tests.deploy import manifests
from tests.deploy.compose_redis import ADMIN_USER, GuideFiles, compose_redis, make_guide_files
from tests.faults.servers import RedisServer

#: A Redis database of the machine's own Redis for tests that need no password (test_database_tls).
REDIS_DB = support.PRODUCTION_REDIS_DB
#: The audit log's signing key file as the worker's manifest mounts it.
SIGNING_KEY = "dermq-audit-signing-key.json"


def secret_modes(workload: manifests.Workload, container: dict) -> dict[str, int]:  # type: ignore[type-arg]
    """File name under the secrets mount -> the mode Kubernetes gives it (item mode, else defaultMode)."""
    volumes = {volume["name"]: volume for volume in workload.pod.get("volumes", [])}
    modes: dict[str, int] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        projected = volume.get("projected")
        sources = [s["secret"] for s in projected["sources"] if "secret" in s] if projected else []
        default = (
            projected.get("defaultMode", 0o644) if projected else volume.get("secret", {}).get("defaultMode", 0o644)
        )
        if "secret" in volume:
            sources.append(volume["secret"])
        for secret in sources:
            for item in secret.get("items", []):
                modes[item["path"]] = int(item.get("mode", default))
    return modes


def production_env(base: dict[str, str], secrets_dir: Path, stack_env: dict[str, str]) -> dict[str, str]:
    """The shipped environment, pointed at this machine's Postgres and Redis, at free ports, and at
    secret files under ``secrets_dir`` (and a witness file and the period-key folder beside it)
    instead of /run/secrets and the volumes."""
    moved = {k: v.replace("/run/secrets", str(secrets_dir)) for k, v in base.items()}
    if "DERMQ_AUDIT_WITNESS_FILE" in moved:
        moved["DERMQ_AUDIT_WITNESS_FILE"] = str(secrets_dir.parent / "witness.log")
    if "DERMQ_PERIOD_KEY_DIR" in moved:  # the period-keys volume, shared by the API and the worker
        moved["DERMQ_PERIOD_KEY_DIR"] = str(secrets_dir.parent / "period-keys")
    assert "DERMQ_REDIS_URL" not in moved, "the Redis URL holds a password: it comes from dermq_redis_url"
    return {
        **moved,
        "DERMQ_SECRETS_DIR": str(secrets_dir),
        "DERMQ_KEY_FILE": str(secrets_dir / "dermq-keys.json"),
        "DERMQ_API_HOST": "127.0.0.1",
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_METRICS_HOST": "127.0.0.1",
        "DERMQ_METRICS_PORT": str(support.free_port()),
        "DERMQ_WORKER_METRICS_PORT": str(support.free_port()),
        "DERMQ_DEVICE": "cpu",
        # the test stack's rate limits: the tests share one address
        **{k: v for k, v in stack_env.items() if k.startswith("DERMQ_RATE_LIMIT_")},
    }


def write_secrets(
    secrets_dir: Path, stack_env: dict[str, str], modes: dict[str, int], database_url: str, redis_url: str
) -> None:
    """The secret files the services read, with the modes the deployment gives them: the key file,
    the database URL (the runtime role's), the Redis URL and the audit log's signing key (for the
    origin that the deployment's settings name)."""
    from core.checkpoint import generate, write_signing_keys
    from core.config import Settings

    secrets_dir.mkdir(mode=0o700)
    shutil.copyfile(stack_env["DERMQ_KEY_FILE"], secrets_dir / "dermq-keys.json")
    (secrets_dir / "dermq_database_url").write_text(database_url)
    (secrets_dir / manifests.REDIS_URL).write_text(redis_url)
    origin = manifests.configmap_data().get("DERMQ_AUDIT_LOG_ORIGIN", Settings.model_fields["audit_log_origin"].default)
    write_signing_keys(secrets_dir / SIGNING_KEY, generate(origin))
    for name in ("dermq-keys.json", "dermq_database_url", manifests.REDIS_URL, SIGNING_KEY):
        (secrets_dir / name).chmod(modes.get(name, modes["dermq-keys.json"]))


@pytest.fixture
def runtime_database(settings, database) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A migrated database of this module's own with the owner and runtime roles; yields the runtime
    role's URL, the login every service has in a deployment (production refuses the owner's)."""
    from core import db_roles

    name = f"{support.TEST_DATABASE}_production"
    url = make_url(settings.database_url).set(database=name)
    owner, runtime = f"{name}_owner", f"{name}_app"
    support.recreate_database(url.render_as_string(False))
    support.migrate(url.render_as_string(False))
    local = settings.model_copy(update={"database_url": url.render_as_string(False)})
    try:
        db_roles.set_up_roles(local, owner=owner, runtime=runtime, owner_password=None, runtime_password=None)
        db_roles.grant(local, runtime)
        yield url.set(username=runtime).render_as_string(False)
    finally:
        dispose_engines()
        support.drop_database(url.render_as_string(False))
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            for role in (owner, runtime):
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.fixture(scope="module")
def redis_files(tmp_path_factory: pytest.TempPathFactory) -> GuideFiles:
    """Redis's secret files as the secrets guide's commands make them."""
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    return make_guide_files(tmp_path_factory.mktemp("redis-secrets"))


@pytest.fixture(scope="module")
def protected_redis(redis_files: GuideFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own, started as compose starts it, with the users the secrets
    guide's commands make; its URL names the services' user, which may not run Redis's dangerous
    commands. No other worker of the test run takes its cases."""
    server = compose_redis(redis_files, tmp_path_factory.mktemp("redis-data"))
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def production_redis(protected_redis: RedisServer, redis_files: GuideFiles) -> Iterator[str]:
    """The protected Redis's URL, with its password, emptied before and after the test (by the
    operators' user: the services' may not)."""
    client = redis.Redis(port=protected_redis.port, username=ADMIN_USER, password=redis_files.admin_password)
    client.flushdb()
    yield protected_redis.url
    client.flushdb()
    client.close()


@pytest.mark.slow
def test_kubernetes_modes_and_environment_start_an_api_and_a_worker_that_classify(  # type: ignore[no-untyped-def]
    tmp_path: Path, stack_env, settings, keyring, runtime_database, production_redis, jpeg_bytes
) -> None:
    api, worker = manifests.workload("api"), manifests.workload("worker")
    api_container, worker_container = api.containers[0], worker.containers[0]
    modes = secret_modes(api, api_container)
    assert modes["dermq-keys.json"] & 0o040, "the manifests are expected to mount the key file group-readable"
    assert secret_modes(worker, worker_container)["dermq-keys.json"] == modes["dermq-keys.json"]
    secrets_dir = tmp_path / "secrets"
    modes.update(secret_modes(worker, worker_container))
    write_secrets(secrets_dir, stack_env, modes, runtime_database, production_redis)
    assert modes[manifests.REDIS_URL] == modes["dermq-keys.json"]
    env = production_env(manifests.container_environment(api_container), secrets_dir, stack_env)
    assert env["DERMQ_ENVIRONMENT"] == "production"
    worker_env = production_env(manifests.container_environment(worker_container), secrets_dir, stack_env)
    Path(env["DERMQ_PERIOD_KEY_DIR"]).mkdir(mode=0o700)  # the volume the pods mount (the images make the folder)

    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    server = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    try:
        support.wait_for(lambda: processes.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        assert server.alive(), "the API stopped at start-up in production mode"
        process = processes.start_worker(worker_env, tmp_path / "worker.log", name="production")
        try:
            tenant = new_tenant(settings.model_copy(update={"database_url": runtime_database}), keyring)
            with httpx.Client(base_url=base, timeout=30) as http:
                assert http.get("/readyz").json()["status"] == "ready"
                files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
                submitted = http.post("/v1/cases", files=files, headers=tenant.headers)
                assert submitted.status_code == 202, submitted.text
                case_url = submitted.headers["Location"]
                finished = support.wait_for(
                    lambda: (
                        (c := http.get(case_url, headers=tenant.headers).json())["status"] in ("succeeded", "failed")
                        and c
                    ),
                    timeout=120,
                    what="the production worker to finish the case",
                )
            assert finished["status"] == "succeeded", finished
        finally:
            process.stop()
    finally:
        server.stop()


def test_the_compose_instructions_modes_let_the_api_start(
    tmp_path: Path, stack_env, runtime_database, production_redis
) -> None:  # type: ignore[no-untyped-def]
    readme = manifests.SECRETS_README.read_text()
    found = re.search(r"chmod (\d{3}) [^\n]*dermq-keys\.json", readme)
    assert found, "deploy/secrets/README.md no longer says which mode the key file gets"
    mode = int(found.group(1), 8)
    services = manifests.compose_services()
    secrets_dir = tmp_path / "secrets"
    modes = {"dermq-keys.json": mode, "dermq_database_url": mode, manifests.REDIS_URL: mode}
    write_secrets(secrets_dir, stack_env, modes, runtime_database, production_redis)
    assert stat.S_IMODE((secrets_dir / "dermq-keys.json").stat().st_mode) == mode
    env = production_env(manifests.compose_environment(services["api"]), secrets_dir, stack_env)
    assert env["DERMQ_ENVIRONMENT"] == "production"
    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    server = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    try:
        support.wait_for(lambda: processes.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        assert server.alive(), "the API stopped at start-up in production mode"
        assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
    finally:
        server.stop()


@pytest.mark.parametrize("key_mode", [0o444, 0o440], ids=["world-readable", "group-readable"])
def test_a_world_readable_key_file_stops_the_api_at_start_up(  # type: ignore[no-untyped-def]
    tmp_path: Path, stack_env, runtime_database, production_redis, key_mode: int
) -> None:
    # 0o440, the manifests' mode, is the control: the same environment, and the API starts
    secrets_dir = tmp_path / "secrets"
    modes = {"dermq-keys.json": key_mode, "dermq_database_url": 0o440, manifests.REDIS_URL: 0o440, SIGNING_KEY: 0o440}
    write_secrets(secrets_dir, stack_env, modes, runtime_database, production_redis)
    env = production_env(manifests.configmap_data(), secrets_dir, stack_env)
    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    server = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    try:
        if key_mode & 0o004:
            assert server.proc.wait(60) != 0
            assert "dermq-keys.json has mode 444" in server.output(), "the operator is told which file to fix"
        else:
            support.wait_for(lambda: processes.api_up(base) or not server.alive(), timeout=60, what="the API to start")
            assert server.alive(), server.output()
            assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
    finally:
        server.stop()


def test_the_callback_workers_manifest_starts_it_in_production_on_threads_without_period_keys(  # type: ignore[no-untyped-def]
    tmp_path: Path, stack_env, runtime_database, production_redis
) -> None:
    # Its secrets (database URL, key file) with the modes the manifest gives them, and no period-key
    # folder at all: it mounts none, and starting must not need one.
    callbacks = manifests.workload("callbacks")
    (container,) = callbacks.containers
    modes = secret_modes(callbacks, container)
    assert set(modes) == manifests.SECRETS_READ["callbacks"]
    secrets_dir = tmp_path / "secrets"
    write_secrets(secrets_dir, stack_env, modes, runtime_database, production_redis)
    (secrets_dir / SIGNING_KEY).unlink()  # not mounted there
    env = production_env(manifests.container_environment(container), secrets_dir, stack_env)
    assert env["DERMQ_ENVIRONMENT"] == "production"
    assert not Path(env["DERMQ_PERIOD_KEY_DIR"]).exists()
    queues = container["command"][container["command"].index("--queues") + 1]
    process = processes.start_worker(
        env, tmp_path / "callbacks.log", name="callbacks", app=manifests.CALLBACKS_APP, queues=queues
    )
    try:
        pool = process.stats()["pool"]
        assert "thread" in pool["implementation"], pool
        assert pool["max-concurrency"] == int(env["DERMQ_CALLBACK_WORKER_THREADS"])
        assert process.metrics(), "its metrics listener answers"
        assert process.alive()
    finally:
        process.stop()


def test_a_wrong_redis_password_is_reported_and_never_printed(  # type: ignore[no-untyped-def]
    tmp_path: Path, stack_env, runtime_database, protected_redis: RedisServer
) -> None:
    # The API's pod with every file as shipped but a Redis URL whose password Redis refuses: the API
    # starts (its liveness needs no Redis) and is not ready, saying why; the worker pods' liveness
    # command fails at once, saying why. Neither prints the password.
    wrong = secrets.token_urlsafe(24)
    api = manifests.workload("api")
    (container,) = api.containers
    secrets_dir = tmp_path / "secrets"
    write_secrets(
        secrets_dir, stack_env, secret_modes(api, container), runtime_database, protected_redis.url_with(wrong)
    )
    env = production_env(manifests.container_environment(container), secrets_dir, stack_env)
    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    server = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    try:
        support.wait_for(lambda: processes.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        assert server.alive(), server.output()
        answer = httpx.get(f"{base}/readyz", timeout=10)
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"postgres": "ok", "redis": "unreachable (AuthenticationError)"}
    finally:
        server.stop()
    command = manifests.workload("worker").containers[0]["livenessProbe"]["exec"]["command"]
    (liveness,) = [part for part in command if part.startswith("celery -A ")]
    probe = [str(support.VENV_BIN / "celery"), *liveness.split()[1:]]
    assert probe[1:5] == ["-A", "worker.celery_app", "inspect", "ping"], liveness
    done = subprocess.run(probe, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "invalid username-password pair" in done.stdout + done.stderr
    for output in (server.output(), done.stdout + done.stderr, answer.text):
        assert wrong not in output and protected_redis.password not in output
