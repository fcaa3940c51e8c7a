"""Flower, the operators' queue view: basic auth always, and the password never on a command line."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
import redis

from tests import processes, support


def flower_answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_flower_demands_its_password_which_no_command_line_shows(stack_env, tmp_path: Path, redis_client) -> None:  # type: ignore[no-untyped-def]
    password = secrets.token_urlsafe(18)
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_FLOWER_PASSWORD": password,
        "DERMQ_FLOWER_PORT": str(port),
        "DERMQ_FLOWER_USER": "operator",
    }
    flower = processes.Process("flower", [str(support.VENV_BIN / "dermq-flower")], env, tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_for(lambda: flower_answers(base) or not flower.alive(), timeout=60, what="Flower to listen")
        assert flower.alive()
        assert httpx.get(f"{base}/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/workers", timeout=10, auth=("operator", "wrong")).status_code == 401
        assert httpx.get(f"{base}/workers", timeout=10, auth=("operator", password)).status_code == 200
        cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
    finally:
        flower.stop()
    assert password not in flower.output()


def production_env(stack_env: dict[str, str], password: str) -> dict[str, str]:
    """The test stack's environment as production accepts it (the callback SSRF guard on), with
    ``password`` as Flower's: whether Flower starts then depends on the password alone."""
    return {
        **stack_env,
        "DERMQ_ENVIRONMENT": "production",
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "false",
        "DERMQ_FLOWER_PASSWORD": password,
        "DERMQ_FLOWER_PORT": str(support.free_port()),
        "DERMQ_FLOWER_USER": "operator",
    }


@pytest.mark.parametrize("password", ["", "REPLACE_ME_FLOWER_PASSWORD", "short-pw-11"])
def test_flower_refuses_to_start_without_a_real_password_in_production(
    stack_env, tmp_path: Path, password: str
) -> None:  # type: ignore[no-untyped-def]
    env = production_env(stack_env, password)
    flower = processes.Process("flower", [str(support.VENV_BIN / "dermq-flower")], env, tmp_path / "flower.log")
    try:
        assert flower.proc.wait(60) != 0
    finally:
        flower.stop()
    assert "DERMQ_FLOWER_PASSWORD" in flower.output(), "the operator is told which setting to fix"


def test_flower_starts_in_production_with_a_real_password(stack_env, tmp_path: Path, redis_client) -> None:  # type: ignore[no-untyped-def]
    # the control of the test above: the same environment, a real password
    password = secrets.token_urlsafe(18)
    env = production_env(stack_env, password)
    flower = processes.Process("flower", [str(support.VENV_BIN / "dermq-flower")], env, tmp_path / "flower.log")
    base = f"http://127.0.0.1:{env['DERMQ_FLOWER_PORT']}"
    try:
        support.wait_for(lambda: flower_answers(base) or not flower.alive(), timeout=60, what="Flower to listen")
        assert flower.alive(), flower.output()
        assert httpx.get(f"{base}/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/workers", timeout=10, auth=("operator", password)).status_code == 200
    finally:
        flower.stop()


def test_the_worker_configuration_flower_shows_holds_no_password(settings) -> None:  # type: ignore[no-untyped-def]
    # Flower's worker page and `celery inspect conf` show the app's configuration, masking only names
    # that look secret: dermq's settings kept there showed the database's and Redis's passwords
    import json
    from types import SimpleNamespace

    from celery.worker.control import conf as dump_conf

    from worker.celery_app import create_app

    secret = secrets.token_hex(8)
    app = create_app(
        settings.model_copy(
            update={
                "database_url": f"postgresql+psycopg2://dermq:{secret}@db/dermq",
                "redis_url": f"redis://:{secret}@redis:6379/0",
            }
        )
    )
    shown = json.dumps(dump_conf(SimpleNamespace(app=app), with_defaults=True), default=str)
    assert "task_acks_late" in shown  # the configuration is there
    assert secret not in shown


def test_flowers_log_lines_are_json_like_every_other_process(stack_env, tmp_path: Path, redis_client) -> None:  # type: ignore[no-untyped-def]
    # docs/OPERATIONS.md: "Logs: JSON lines on stderr"; Flower's came in tornado's own format, over
    # several lines each ("[I 261206 20:25:21 command:177] Visit me at ..."), past dermq's formatter
    # and the fields it keeps (an exception's type, never its text)
    import json

    port = support.free_port()
    env = {**stack_env, "DERMQ_FLOWER_PASSWORD": secrets.token_urlsafe(18), "DERMQ_FLOWER_PORT": str(port)}
    env["DERMQ_LOG_JSON"] = "true"
    flower = processes.Process("flower", [str(support.VENV_BIN / "dermq-flower")], env, tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_for(lambda: flower_answers(base) or not flower.alive(), timeout=60, what="Flower to listen")
        assert flower.alive(), flower.output()
        support.wait_for(lambda: "Registered tasks" in flower.output(), timeout=10, what="Flower's banner")
    finally:
        flower.stop()
    lines = [line for line in flower.output().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # each line one JSON object
    assert {entry["component"] for entry in entries} == {"flower"}
    assert any("Visit me at" in entry["msg"] for entry in entries)


def test_flowers_broker_page_shows_the_queues(stack_env, tmp_path: Path, private_broker) -> None:  # type: ignore[no-untyped-def]
    # docs/OPERATIONS.md: "Flower: the queue and the workers". Its Broker page and queue lengths
    # answered 404 "'redis' broker is not supported": Flower picks its broker client by the URL's
    # scheme, and the transport dermq's apps name (core.redis_transport) made it "core.redis_transport:Transport".
    # A broker of its own: the message it counts is no task, and no worker may take it
    check_flower_shows_the_queues(stack_env, private_broker.url, tmp_path / "flower.log")


def check_flower_shows_the_queues(env: dict[str, str], broker_url: str, log: Path) -> None:
    """Flower on ``broker_url`` (otherwise ``env``) shows a message waiting on ``cases`` on its Broker
    page and in its queue lengths to the operator who logs in, and answers anyone else 401."""
    password, port = secrets.token_urlsafe(18), support.free_port()
    env = {
        **env,
        "DERMQ_FLOWER_PASSWORD": password,
        "DERMQ_FLOWER_PORT": str(port),
        "DERMQ_FLOWER_USER": "operator",
        "DERMQ_REDIS_URL": broker_url,
    }
    redis.Redis.from_url(broker_url).lpush("cases", "a message waiting")
    flower = processes.Process("flower", [str(support.VENV_BIN / "dermq-flower")], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_for(lambda: flower_answers(base) or not flower.alive(), timeout=60, what="Flower to listen")
        assert flower.alive(), flower.output()
        assert httpx.get(f"{base}/broker", timeout=10).status_code == 401
        page = httpx.get(f"{base}/broker", timeout=10, auth=("operator", password))
        assert page.status_code == 200, page.text[:300]
        lengths = httpx.get(f"{base}/api/queues/length", timeout=10, auth=("operator", password))
        assert lengths.status_code == 200, lengths.text[:300]
        queues = {queue["name"]: queue["messages"] for queue in lengths.json()["active_queues"]}
        assert queues.get("cases") == 1, queues
    finally:
        flower.stop()
