"""API fixtures: a live uvicorn server process for tests that need real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support

live_api_process: list[support.Process] = []


@pytest.fixture(scope="session")
def live_api(stack_env: dict[str, str], stack_dir: Path, database, redis_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The API in its own process (uvicorn), with a 1 MiB upload cap; yields its base URL."""
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(port),
        "DERMQ_MAX_UPLOAD_BYTES": str(1024 * 1024),
        "DERMQ_METRICS_PORT": str(support.free_port()),
    }
    server = support.Process("api", [str(support.VENV_BIN / "dermq-api")], env, stack_dir / "live-api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_for(lambda: support.api_up(base) or not server.alive(), timeout=60, what="the API to start")
        if not server.alive():
            raise RuntimeError(server.output()[-3000:])
        server.metrics_url = f"http://127.0.0.1:{env['DERMQ_METRICS_PORT']}/metrics"  # type: ignore[attr-defined]
        live_api_process.append(server)
        yield base
    finally:
        server.stop()
