"""A weights file changed by one byte: the worker refuses it, the case fails with model_error, and
the worker stays up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from core.publisher import make_publisher, publish_classify
from ml import registry
from tests import support
from tests.worker.test_tasks import wait_terminal

pytestmark = pytest.mark.usefixtures("database")


def test_tampered_weights_fail_the_case_not_the_worker(
    stack_env, stack_dir: Path, tmp_path: Path, settings, tenant, store_case, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    entry = tmp_path / "tampered-entry"
    shutil.copytree(registry.resolve(settings.model), entry)
    weights = entry / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    # Its own Redis database, so the suite's main worker never takes these messages.
    env = {**stack_env, "DERMQ_MODEL": str(entry), "DERMQ_REDIS_URL": "redis://127.0.0.1:6379/11"}
    redis.Redis.from_url(env["DERMQ_REDIS_URL"]).flushdb()
    worker = support.start_worker(env, stack_dir / "tampered-worker.log", name="tampered")
    try:
        publisher = make_publisher(settings.model_copy(update={"redis_url": env["DERMQ_REDIS_URL"]}))
        first, second = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
        for case_id in (first, second):
            publish_classify(publisher, case_id, "routine")
        for case_id in (first, second):
            case = wait_terminal(settings, case_id, timeout=60)
            assert (case.status, case.failure_code) == ("failed", "model_error")
            assert "integrity check" in case.failure_message and "not loaded" in case.failure_message
        assert worker.alive()
        assert "model_load_failed" in worker.output()
    finally:
        worker.stop()
