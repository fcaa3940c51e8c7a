"""core.config: one validated Settings object, refusing unsafe combinations."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.config import Settings, get_settings
from tests import support


def test_time_limits_must_nest_inside_the_visibility_timeout() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(task_soft_time_limit=60, task_time_limit=90, broker_visibility_timeout=60)
    with pytest.raises(ValidationError, match="task_soft_time_limit < task_time_limit"):
        Settings(task_soft_time_limit=90, task_time_limit=60)
    with pytest.raises(ValidationError, match="gradcam_budget_seconds"):
        Settings(gradcam_budget_seconds=120)


def test_a_callback_retry_never_waits_longer_than_redis_keeps_it_unacknowledged() -> None:
    # the countdown is held by the worker, unacknowledged: past the visibility timeout Redis hands the
    # message out again and a second delivery chain starts
    Settings()  # the defaults fit
    with pytest.raises(ValidationError, match="callback_backoff_max_seconds"):
        Settings(callback_backoff_max_seconds=300, broker_visibility_timeout=300)
    # nor a callback waiting its turn at a clinic's receiver: it waits no longer than the longest backoff
    from core.callback_pacing import turn_seconds

    short = Settings(
        task_soft_time_limit=15, task_time_limit=18, broker_visibility_timeout=60, callback_backoff_max_seconds=30
    )
    assert max(turn_seconds(short, waited) for waited in range(12) for _ in range(20)) <= 30
    assert max(turn_seconds(Settings(), 12) for _ in range(20)) <= 60
    assert turn_seconds(Settings(), 5000) <= 60  # a callback that has waited all day (2.0**5000 overflows)
    from core.callbacks import backoff_seconds

    assert backoff_seconds(Settings(callback_max_attempts=5000), 4999) <= 180  # nor a long-allowed retry


def test_a_callback_timeout_is_not_bound_by_the_classification_time_limit() -> None:
    """Attempts run on the callback worker's threads, where Celery enforces no time limit: each ends at
    its own deadline, three timeouts (worker.callbacks.post), within its lease. A 20 s timeout was
    refused while attempts ran in classification children under the 60 s soft limit."""
    from core.callbacks import lease_seconds

    settings = Settings(callback_timeout_seconds=20)
    assert lease_seconds(settings) > 3 * 20
    # but a retry waits out its backoff unacknowledged, then makes its attempt: both within Redis's
    # visibility timeout (300 s), or a second copy starts its own retries, without the backoff
    with pytest.raises(ValidationError, match="callback_backoff_max_seconds plus one attempt"):
        Settings(callback_timeout_seconds=40)  # 180 s of backoff + 125 s


def test_a_callback_lease_outlasts_any_attempt_the_task_limit_allows() -> None:
    from core.callbacks import lease_seconds

    assert lease_seconds(Settings()) > Settings().task_time_limit  # a second worker cannot lease a row in use


def test_flower_refuses_missing_or_example_passwords() -> None:
    with pytest.raises(ValueError, match="FLOWER_PASSWORD"):
        Settings().require_flower_password()
    with pytest.raises(ValueError, match="example"):
        Settings(environment="production", flower_password="changeme").require_flower_password()
    strong = Settings(environment="production", flower_password="k3y-from-a-secret-store")
    assert strong.require_flower_password() == "k3y-from-a-secret-store"
    # Only Flower needs it: every other process starts without one.
    assert Settings(environment="production").environment == "production"


@pytest.mark.parametrize(
    "placeholder",
    ["REPLACE_ME_FLOWER_PASSWORD", "<flower password here>", "change-me-to-something-long", "example-password-1"],
)
def test_flower_refuses_template_placeholders_in_production(placeholder: str) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        Settings(environment="production", flower_password=placeholder).require_flower_password()


def test_production_is_the_environment_unless_another_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DERMQ_ENVIRONMENT", raising=False)
    assert Settings().environment == "production"
    monkeypatch.setenv("DERMQ_ENVIRONMENT", "development")
    assert Settings().environment == "development"


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql+asyncpg://db/dermq", "postgresql:dermq"])
def test_only_postgres_through_psycopg2(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMQ_DATABASE_URL", url)
    with pytest.raises(ValidationError, match="PostgreSQL URL for psycopg2"):
        Settings()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_plain_postgres_url_gets_the_driver_dermq_installs(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the URL libpq, psql and most hosting consoles give: SQLAlchemy would look for psycopg (3) for it
    monkeypatch.setenv("DERMQ_DATABASE_URL", f"{scheme}://dermq@db.internal:5432/dermq?sslmode=verify-full")
    assert Settings().database_url == "postgresql+psycopg2://dermq@db.internal:5432/dermq?sslmode=verify-full"


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMQ_API_PORT", "9001")
    monkeypatch.setenv("DERMQ_RETENTION_DAYS", "7")
    settings = Settings()
    assert settings.api_port == 9001 and settings.retention_days == 7


def test_every_deployment_serves_the_registrys_default_model() -> None:
    """One default model: the settings, compose and Kubernetes all name the entry ml.registry ships as default."""
    from pathlib import Path

    import yaml

    from ml import registry

    root = Path(__file__).resolve().parents[2]
    assert Settings().model == registry.DEFAULT_MODEL
    assert (registry.REGISTRY_DIR / registry.DEFAULT_MODEL / registry.MANIFEST).is_file()
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    configmap = yaml.safe_load((root / "deploy" / "k8s" / "configmap.yaml").read_text())
    assert compose["x-dermq-env"]["DERMQ_MODEL"] == registry.DEFAULT_MODEL
    assert configmap["data"]["DERMQ_MODEL"] == registry.DEFAULT_MODEL


# --------------------------------------------------------------------------- database transport (core/db_tls.py)

SECRET = "hunter2-app-password"
CA = "sslrootcert=/run/secrets/postgres-ca.crt"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg2://dermq_app:{SECRET}@postgres:5432/dermq",
        f"postgresql+psycopg2://dermq_app:{SECRET}@db.example.org/dermq?sslmode=require&{CA}",
        f"postgresql+psycopg2://dermq_app:{SECRET}@db.example.org/dermq?sslmode=verify-ca&{CA}",
        f"postgresql+psycopg2://dermq_app:{SECRET}@10.0.0.5/dermq?sslmode=prefer",
        # a local name in the URL does not make a remote address or a second, remote host local
        f"postgresql+psycopg2://dermq_app:{SECRET}@localhost/dermq?hostaddr=10.0.0.5",
        f"postgresql+psycopg2://dermq_app:{SECRET}@/dermq?host=/var/run/postgresql,db.example.org",
    ],
)
def test_production_refuses_a_network_database_without_verify_full(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("PGHOST", "PGHOSTADDR", "PGSSLMODE"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValidationError, match="sslmode=verify-full") as refused:
        Settings(environment="production", database_url=url)
    assert SECRET not in str(refused.value), "the refusal must not print the URL's password"
    assert Settings(environment="development", database_url=url).database_url == url  # a developer's choice


@pytest.mark.parametrize(
    ("field", "url"),
    [
        (
            "database_url",
            f"postgresql+psycopg2://dermq_app:REPLACE_ME_APP_PASSWORD@postgres:5432/dermq?sslmode=verify-full&{CA}",
        ),
        ("database_url", f"postgresql+psycopg2://dermq_app:%3Cpassword%3E@postgres/dermq?sslmode=verify-full&{CA}"),
        # a "/" in it (the driver reads the password to the "@"): judged as no password at all before
        ("database_url", f"postgresql+psycopg2://u:%3Cfrom/the/vault%3E@postgres/dermq?sslmode=verify-full&{CA}"),
        ("redis_url", "redis://:changeme@redis:6379/0"),
        # an "@" in it: redis-py reads the password to the last one, and so is it judged
        ("redis_url", "redis://:gen@REPLACE_ME@redis:6379/0"),
    ],
)
def test_production_refuses_a_template_password_in_a_connection_url(field: str, url: str) -> None:
    # the Kubernetes template's placeholders were accepted as the database's password
    with pytest.raises(ValidationError, match="placeholder") as refused:
        Settings(environment="production", **{field: url})
    assert "REPLACE_ME" not in str(refused.value) and "changeme" not in str(refused.value)
    assert getattr(Settings(environment="development", **{field: url}), field) == url


@pytest.mark.parametrize(
    "password", ["Xk9%3Ct7QmW2pLz8", "Xk9%3Et7QmW2pLz8", "counterexample-42-Jx9", "admin/Xk9t7QmW2pLz8"]
)
def test_production_takes_a_generated_password_that_holds_a_placeholders_characters(password: str) -> None:
    # "<", ">" and "example" mark a placeholder in Flower's password; in a generated one they are chance.
    # A "/" (base64) does not end it: the driver reads it to the "@", and it was judged by its start
    url = f"postgresql+psycopg2://dermq_app:{password}@postgres:5432/dermq?sslmode=verify-full&{CA}"
    assert Settings(environment="production", database_url=url).database_url == url


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg2://dermq_app:{SECRET}@postgres:5432/dermq?sslmode=verify-full&{CA}",
        f"postgresql+psycopg2://dermq_app:{SECRET}@db.example.org/dermq?{CA}&sslmode=verify-full",
        # local: a Unix socket or a loopback address crosses no network
        "postgresql+psycopg2:///dermq",
        "postgresql+psycopg2://dermq@/dermq?host=/var/run/postgresql",
        f"postgresql+psycopg2://dermq_app:{SECRET}@127.0.0.1:5432/dermq",
        f"postgresql+psycopg2://dermq_app:{SECRET}@localhost/dermq",
        f"postgresql+psycopg2://dermq_app:{SECRET}@[::1]:5432/dermq",
    ],
)
def test_production_accepts_verify_full_or_a_local_database(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("PGHOST", "PGHOSTADDR", "PGSSLMODE"):
        monkeypatch.delenv(variable, raising=False)
    assert Settings(environment="production", database_url=url).database_url == url


def test_libpq_environment_counts_where_the_url_names_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example.org")
    monkeypatch.delenv("PGSSLMODE", raising=False)
    with pytest.raises(ValidationError, match=r"db\.example\.org is reached with sslmode=prefer"):
        Settings(environment="production", database_url="postgresql+psycopg2:///dermq")
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    assert Settings(environment="production", database_url="postgresql+psycopg2:///dermq")
    # the URL's own mode wins over the environment's
    with pytest.raises(ValidationError, match="sslmode=require"):
        Settings(environment="production", database_url="postgresql+psycopg2:///dermq?sslmode=require")


def test_a_secret_file_that_others_may_read_stops_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "dermq_flower_password"
    secret.write_text("k3y-from-a-secret-store")
    certificate = tmp_path / "postgres-ca.crt"  # not a setting's file: a public certificate may be world-readable
    certificate.write_text("-----BEGIN CERTIFICATE-----")
    certificate.chmod(0o644)
    monkeypatch.setenv("DERMQ_SECRETS_DIR", str(tmp_path))
    try:
        for mode in (0o600, 0o440):  # the owner's, or read through the group Kubernetes mounts it with
            secret.chmod(mode)
            get_settings.cache_clear()
            assert get_settings().flower_password.get_secret_value() == "k3y-from-a-secret-store"
        for mode in (0o644, 0o604, 0o660):
            secret.chmod(mode)
            get_settings.cache_clear()
            with pytest.raises(ValueError, match=f"{secret} has mode {mode:o}: others may read or change it"):
                get_settings()
    finally:
        get_settings.cache_clear()


def test_a_secret_file_named_in_upper_case_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings finds DERMQ_FLOWER_PASSWORD as it finds dermq_flower_password: the check did not
    secret = tmp_path / "DERMQ_FLOWER_PASSWORD"
    secret.write_text("k3y-from-a-secret-store")
    secret.chmod(0o644)
    monkeypatch.setenv("DERMQ_SECRETS_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="DERMQ_FLOWER_PASSWORD has mode 644"):
            get_settings()
        secret.chmod(0o600)
        get_settings.cache_clear()
        assert get_settings().flower_password.get_secret_value() == "k3y-from-a-secret-store"  # it is read
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "everyone", ["*", "0.0.0.0/0", "::/0", "0.0.0.0/0.0.0.0", "128.0.0.0/1", "::ffff:0:0/96", "::/64", "10.0.0.0/7"]
)
def test_production_refuses_trusting_every_address_with_the_forwarded_headers(everyone: str) -> None:
    # A client that talks to the API directly would choose the address it is limited and audited
    # under: "*" was refused, but a network of every address (the same trust) was taken.
    with pytest.raises(ValidationError, match="lets any client choose the address"):
        Settings(environment="production", forwarded_allow_ips=["10.0.0.0/8", everyone])
    assert Settings(environment="development", forwarded_allow_ips=[everyone]).forwarded_allow_ips == [everyone]
    proxies = ["10.0.0.0/8", "fd00::/8", "::ffff:10.0.0.0/104", "2001:db8::/32", "130.211.0.0/22", "172.20.0.5"]
    assert Settings(environment="production", forwarded_allow_ips=proxies).forwarded_allow_ips == proxies


def test_production_refuses_private_callback_receivers() -> None:
    # DERMQ_CALLBACK_ALLOW_PRIVATE_URLS turns off the SSRF guard (core/callback_urls.py): a clinic could
    # have the callback worker, the one process with a route out, POST to the cluster's own services
    with pytest.raises(ValidationError, match="DERMQ_CALLBACK_ALLOW_PRIVATE_URLS turns off the callback SSRF guard"):
        Settings(environment="production", callback_allow_private_urls=True)
    assert Settings(environment="development", callback_allow_private_urls=True).callback_allow_private_urls


@pytest.mark.parametrize(
    "command", [["celery", "-A", "worker.callbacks_app", "worker", "--queues", "callbacks"], ["dermq-api"]]
)
def test_a_production_callback_worker_or_api_with_private_receivers_allowed_refuses_to_start(
    stack_env: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    # the test stack (which allows them, for its receivers on 127.0.0.1) as production takes it, but for that
    env = {**os.environ, **stack_env, "DERMQ_ENVIRONMENT": "production", "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "true"}
    argv = [str(support.VENV_BIN / command[0]), *command[1:]]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0, "a production process started with the callback SSRF guard off"
    assert "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS" in done.stdout + done.stderr
