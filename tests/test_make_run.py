"""`make run` on a fresh database: the whole stack comes up, classifies a real image, and Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests import support


@pytest.fixture
def fresh_stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a `make run` on a database that does not exist yet and an empty Redis
    database; afterwards the database, the two logins `make run` creates for it (core.devstack) and
    the Redis data are gone again."""
    database = f"{support.TEST_DATABASE}_makerun"
    env = support.test_env(
        tmp_path,
        DERMQ_DATABASE_URL=f"postgresql+psycopg2:///{database}",
        DERMQ_REDIS_URL=f"redis://127.0.0.1:6379/{support.MAKE_RUN_REDIS_DB}",
        DERMQ_API_PORT=str(support.free_port()),
        DERMQ_METRICS_PORT=str(support.free_port()),
        DERMQ_WORKER_METRICS_PORT=str(support.free_port()),
        DERMQ_CALLBACK_WORKER_METRICS_PORT=str(support.free_port()),
        DERMQ_FLOWER_PORT=str(support.free_port()),
    )
    client = redis.Redis.from_url(env["DERMQ_REDIS_URL"])
    forget_stack(env["DERMQ_DATABASE_URL"], client)  # make run must create the database and its roles itself
    try:
        yield env
    finally:
        forget_stack(env["DERMQ_DATABASE_URL"], client)
        client.close()


def forget_stack(url: str, client: redis.Redis) -> None:
    """Drop the database of ``url`` and its owner and runtime logins, and empty the Redis database."""
    support.drop_database(url)
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        for role in (f"{name}_owner", f"{name}_app"):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    admin.dispose()
    client.flushdb()


@pytest.mark.slow
def test_make_run_serves_a_real_case_and_stops_cleanly(
    fresh_stack_env: dict[str, str], tmp_path: Path, fixture_images: dict[str, Path]
) -> None:
    env = {**os.environ, **fresh_stack_env}
    state = tmp_path / "state"
    process = subprocess.Popen(
        ["make", "-s", "run", f"RUN_ARGS=--state-dir {state}"],
        cwd=support.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    try:

        def ready() -> bool:
            assert process.poll() is None, "".join(lines)[-4000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        support.wait_for(ready, timeout=180, interval=0.5, what="make run's API")
        output = "".join(lines)
        token = (state / "demo-key").read_text().strip()
        assert token in output and "curl" in output  # the key and a ready-to-paste example are printed
        headers = {"Authorization": f"Bearer {token}"}
        image = fixture_images["ISIC_0024313"].read_bytes()
        response = httpx.post(f"{base}/v1/cases", headers=headers, files={"image": ("x.jpg", image, "image/jpeg")})
        assert response.status_code == 202, response.text
        case_url = f"{base}{response.headers['location']}"

        def finished() -> dict | None:
            body = httpx.get(case_url, headers=headers, timeout=5).json()
            return body if body["status"] in ("succeeded", "failed") else None

        body = support.wait_for(finished, timeout=180, interval=0.5, what="the demo case")
        assert body["status"] == "succeeded" and abs(sum(body["result"]["probabilities"].values()) - 1) < 1e-6

        flower = f"http://127.0.0.1:{env['DERMQ_FLOWER_PORT']}/"
        support.wait_for(lambda: _up(flower), timeout=60, what="Flower")
        assert httpx.get(flower, timeout=5).status_code == 401
        password = (state / "flower-password").read_text().strip()
        assert httpx.get(flower, auth=("operator", password), timeout=5).status_code == 200
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    # make itself dies of the SIGINT, as on a terminal; the stack must have shut down in order first. Its
    # output ends once every process of the stack that holds it has exited.
    reader.join(60)
    assert not reader.is_alive(), "processes of the stack still hold its output open"
    assert "dermq | stopped" in [line.strip() for line in lines]  # and the supervisor said so, on a line of its own
    for url in (f"{base}/healthz", f"http://127.0.0.1:{env['DERMQ_FLOWER_PORT']}/"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=2)
    leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.strip()
    assert not leftovers, f"processes left behind: {leftovers}"


def _up(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False
