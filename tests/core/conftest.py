"""Fixtures of the core tests: a private redis-server as broker, so that what the code under test
publishes reaches no worker and can be inspected."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.servers import RedisServer


@pytest.fixture(scope="module")
def private_broker() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    root = Path(tempfile.mkdtemp(prefix="dermq-broker-"))
    server = RedisServer(root)
    server.start()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)
