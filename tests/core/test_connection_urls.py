"""Connection URLs whose password is not percent-encoded where it must be (core/connection_urls.py):
refused when the settings are read, in every environment, naming the setting and never a part of
the password. Before, the clients read part of the password as the host or the port, and the API,
the workers, beat and Flower printed it at start (the database's refusal or connection error named
"<rest of the password>@postgres"; a Redis URL's traceback ended "Port could not be cast to integer
value as '<start of the password>'"). And in production, a Redis reached over a network without a
password, which anyone who reaches it could use to queue tasks or stop the workers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.config import Settings
from tests import support

#: the two halves of a password, around the character that must be percent-encoded
HEAD, TAIL = "Pw7head", "Qx4tail"
CA = "sslmode=verify-full&sslrootcert=/run/secrets/postgres-ca.crt"
DATABASE = f"postgresql+psycopg2://dermq_app:{HEAD}@{TAIL}@postgres:5432/dermq?{CA}"
REDIS = [f"redis://:{HEAD}{mark}{TAIL}@redis:6379/0" for mark in "/?#"] + [
    f"redis://dermq:{HEAD}/{TAIL}@redis:6379/0",
    f"rediss://:{HEAD}?{TAIL}@redis:6380/0",
]
MALFORMED = [("database_url", DATABASE), *(("redis_url", url) for url in REDIS)]


@pytest.mark.parametrize("environment", ["development", "production"])
@pytest.mark.parametrize(("field", "url"), MALFORMED)
def test_a_password_that_would_be_read_as_the_host_or_port_is_refused(environment: str, field: str, url: str) -> None:
    with pytest.raises(ValidationError, match=f"DERMQ_{field.upper()} cannot be read") as refused:
        Settings(environment=environment, **{field: url})
    message = str(refused.value)
    assert HEAD not in message and TAIL not in message, "the refusal must not print a part of the password"
    assert "percent-encode" in message or "%40" in message, "the message says what to do"


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("database_url", f"postgresql+psycopg2://dermq_app:{HEAD}%40{TAIL}@postgres:5432/dermq?{CA}"),
        # SQLAlchemy reads '/', '?' and '#' as the password's own up to its first '@'
        ("database_url", f"postgresql+psycopg2://dermq_app:{HEAD}/?#{TAIL}@postgres:5432/dermq?{CA}"),
        ("database_url", "postgresql+psycopg2://dermq@/dermq?host=/var/run/postgresql"),
        ("redis_url", f"redis://:{HEAD}%2F%3F%23{TAIL}@redis:6379/0"),
        # urllib takes the last '@' of the host part: an '@' in the password reads as it should
        ("redis_url", f"redis://:{HEAD}@{TAIL}@redis:6379/0"),
        ("redis_url", "redis://:secret-from-a-store@redis:6379/0"),
        ("redis_url", "rediss://:secret-from-a-store@redis:6380/0?ssl_cert_reqs=required"),
    ],
)
def test_urls_the_clients_read_as_written_are_taken(field: str, url: str) -> None:
    assert getattr(Settings(environment="production", **{field: url}), field) == url


@pytest.mark.parametrize(
    ("command", "field", "url"),
    [
        (["dermq-api"], "DERMQ_DATABASE_URL", DATABASE),
        (["dermq-api"], "DERMQ_REDIS_URL", REDIS[0]),
        (["celery", "-A", "worker.celery_app", "beat"], "DERMQ_REDIS_URL", REDIS[1]),
    ],
)
def test_a_service_refuses_such_a_url_at_start_and_prints_no_part_of_the_password(
    stack_env: dict[str, str], tmp_path: Path, command: list[str], field: str, url: str
) -> None:
    # the test stack's environment (its key file) as production accepts it, but for the one URL
    env = {
        **os.environ,
        **stack_env,
        "DERMQ_ENVIRONMENT": "production",
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "false",
        field: url,
    }
    argv = [str(support.VENV_BIN / command[0]), *command[1:]]
    # (in a folder of its own: a beat that started would leave its schedule file in the checkout)
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, "the service started with a URL it cannot read"
    assert HEAD not in output and TAIL not in output, "the start-up error printed a part of the password"
    assert f"{field} cannot be read" in output


#: Redis URLs that reach a Redis over a network without a password
WITHOUT_PASSWORD = [
    "redis://redis:6379/0",
    "redis://redis.dermq.svc.cluster.local:6379/0",
    "redis://dermq@redis:6379/0",  # a user name alone
    "redis://:@redis:6379/0",
    "rediss://10.0.0.7:6380/0",
]


@pytest.mark.parametrize("url", WITHOUT_PASSWORD)
def test_production_refuses_a_redis_reached_over_a_network_without_a_password(url: str) -> None:
    # whoever reaches such a Redis can queue tasks, tell every worker to shut down (past Flower's
    # login) and clear the rate limits
    with pytest.raises(ValidationError, match="DERMQ_REDIS_URL names no password") as refused:
        Settings(environment="production", redis_url=url)
    message = str(refused.value)
    assert url not in message and "requirepass" in message, "it says what to do, and never prints the URL"
    # make run and the tests' stacks are not production: their local Redis needs none
    assert Settings(environment="development", redis_url=url).redis_url == url
    assert Settings(environment="test", redis_url=url).redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://:secret-from-a-store@redis:6379/0",
        "redis://dermq:secret-from-a-store@redis:6379/0",
        "rediss://:secret-from-a-store@redis:6380/0",
        # on the host itself: a loopback address or a Unix socket (the default URL, a dermq command)
        "redis://127.0.0.1:6379/0",
        "redis://localhost:6379/0",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis.sock?db=0",
    ],
)
def test_production_takes_a_redis_url_with_a_password_or_on_the_host(url: str) -> None:
    assert Settings(environment="production", redis_url=url).redis_url == url


@pytest.mark.parametrize("command", [["dermq-api"], ["dermq-flower"], ["celery", "-A", "worker.celery_app", "beat"]])
def test_a_production_service_refuses_a_redis_without_a_password_at_start(
    stack_env: dict[str, str], command: list[str]
) -> None:
    env = {
        **os.environ,
        **stack_env,
        "DERMQ_ENVIRONMENT": "production",
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "false",
        "DERMQ_FLOWER_PASSWORD": "a-long-flower-password",
        "DERMQ_REDIS_URL": WITHOUT_PASSWORD[0],
    }
    argv = [str(support.VENV_BIN / command[0]), *command[1:]]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, "the service started with a Redis that anyone on the network may use"
    assert "DERMQ_REDIS_URL names no password" in output
    assert WITHOUT_PASSWORD[0] not in output


# --------------------------------------------------------------------------- TLS to Redis (rediss://)

TLS = "rediss://dermq:secret-from-a-store@redis.internal:6380/0"


@pytest.mark.parametrize(
    "query",
    ["?ssl_cert_reqs=required&ssl_ca_certs=/run/secrets/redis-ca.pem", "?ssl_ca_certs=/run/secrets/redis-ca.pem", ""],
)
def test_production_takes_a_tls_url_that_verifies_the_server(query: str) -> None:
    # without ssl_cert_reqs every client verifies, against the system's CAs without ssl_ca_certs
    assert Settings(environment="production", redis_url=TLS + query).redis_url == TLS + query


@pytest.mark.parametrize("reqs", ["none", "optional"])
def test_production_refuses_a_tls_url_that_does_not_verify_the_server(reqs: str) -> None:
    url = f"{TLS}?ssl_cert_reqs={reqs}&ssl_ca_certs=/run/secrets/redis-ca.pem"
    with pytest.raises(ValidationError, match=f"ssl_cert_reqs={reqs} for the Redis at redis.internal") as refused:
        Settings(environment="production", redis_url=url)
    assert "secret-from-a-store" not in str(refused.value)
    assert Settings(environment="development", redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://redis:6379/0?ssl_ca_certs=/ca.pem", "not the scheme rediss://"),
        (f"{TLS}?ssl_check_hostname=false", "ssl_check_hostname is not a TLS parameter"),
        # redis-py (the API, the sweeper) knows no CERT_REQUIRED, which kombu (the workers) would take
        (f"{TLS}?ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs must be required"),
        # redis-py (the API, the sweeper) reads a repeated parameter's first value, kombu its last:
        # production took the second "required" while every redis-py client checked no certificate
        (f"{TLS}?ssl_cert_reqs=none&ssl_cert_reqs=required", "ssl_cert_reqs more than once"),
    ],
)
def test_tls_parameters_that_some_process_would_read_otherwise_are_refused_everywhere(url: str, says: str) -> None:
    for environment in ("development", "production"):
        with pytest.raises(ValidationError, match=says):
            Settings(environment=environment, redis_url=url)
