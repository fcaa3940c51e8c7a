"""A weights file changed by one byte, or a manifest edited so that it stays well formed but changes
the answers (its digests cover the files, not itself): the worker refuses the model, the case fails
with model_error, and the worker stays up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.publisher import make_publisher
from ml import registry
from tests import processes, support
from tests.worker.test_tasks import wait_terminal

pytestmark = pytest.mark.usefixtures("database")


def _flip_a_weights_byte(entry: Path) -> None:
    weights = entry / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def _sharpen_the_calibration(entry: Path) -> None:
    # well formed, every file's digest still the record's: it loads, and its probabilities are other ones
    manifest = registry.read_manifest(entry)
    manifest["decision"]["calibration"]["temperature"] /= 4
    (entry / registry.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper", [_flip_a_weights_byte, _sharpen_the_calibration], ids=["weights", "manifest"])
def test_a_tampered_model_fails_the_case_not_the_worker(
    stack_env, stack_dir: Path, tmp_path: Path, settings, tenant, store_case, jpeg_bytes: bytes, private_broker, tamper
) -> None:  # type: ignore[no-untyped-def]
    entry = tmp_path / "tampered-entry"
    shutil.copytree(registry.resolve(settings.model), entry)
    tamper(entry)
    # A broker of its own (a private redis-server), so that no other worker takes these messages.
    broker = private_broker
    worker = None
    try:
        env = {
            **stack_env,
            "DERMQ_MODEL": str(entry),
            "DERMQ_REDIS_URL": broker.url,
            "DERMQ_WORKER_METRICS_PORT": "0",  # a listener of its own
        }
        # the preload fails: nothing to wait for but the worker's answer to a ping
        worker = processes.start_worker(env, stack_dir / "tampered-worker.log", name="tampered", wait_for_model=False)
        publisher = make_publisher(settings.model_copy(update={"redis_url": broker.url}))
        first, second = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
        for case_id in (first, second):
            support.publish_classify(publisher, case_id, "routine")
        for case_id in (first, second):
            case = wait_terminal(settings, case_id, timeout=60)
            assert (case.status, case.failure_code) == ("failed", "model_error")
            assert "integrity check" in case.failure_message and "not loaded" in case.failure_message
            # nothing of the registry's own error (file names, digests, paths) reaches the clinic
            assert not any(word in case.failure_message for word in ("safetensors", "SHA-256", "/", "manifest"))
        # The worker lives on, serving cases without a model: none loaded, both cases counted failed.
        assert worker.alive() and worker.ping()
        assert worker.models_loaded() == 0
        assert worker.metric("dermq_jobs_total", outcome="failed") == 2
        assert worker.metric("dermq_failures_total", code="model_error") == 2
    finally:
        if worker is not None:
            worker.stop()
