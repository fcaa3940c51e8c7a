"""A deployment pins its model's manifest (DERMQ_MODEL_SHA256, the SHA-256 of manifest.json): a worker
that takes cases serves that manifest alone. The file digests hang from the manifest, and the decision
rule is written in it: an edit that leaves the verification image's answer as it was (a referral
threshold raised, so fewer lesions are referred) passed the known-answer check and was served. A
worker with another manifest, or in production with no pin, refuses to start (its children would fail
every case they claimed); a child that loads an entry edited after its worker started fails its load."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ml import registry
from tests import support

pytestmark = pytest.mark.usefixtures("database")
SHIPPED = registry.manifest_sha256(registry.DEFAULT_MODEL)


def _fewer_referrals(settings, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    entry = tmp_path / "edited-entry"
    shutil.copytree(registry.resolve(settings.model), entry)
    manifest = registry.read_manifest(entry)
    manifest["decision"]["referral_threshold"] = 0.9  # the known answer's label and probabilities unchanged
    (entry / registry.MANIFEST).write_text(json.dumps(manifest))
    return entry


def _start(stack_env: dict[str, str], broker, **env: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    environment = {
        **stack_env,
        "DERMQ_REDIS_URL": broker.url,  # a broker of its own: it takes no other test's cases
        "DERMQ_PRELOAD_MODEL": "false",
        "DERMQ_WORKER_METRICS_PORT": str(support.free_port()),
        **env,
    }
    command = [str(support.VENV_BIN / "celery"), "-A", "worker.celery_app", "worker", "--pool", "solo"]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60, check=False)


def test_a_worker_refuses_to_start_with_another_manifest_than_the_pinned_one(
    stack_env, settings, private_broker, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    entry = _fewer_referrals(settings, tmp_path)
    done = _start(stack_env, private_broker, DERMQ_MODEL=str(entry), DERMQ_MODEL_SHA256=SHIPPED)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "refusing to start" in done.stderr and "not the pinned one" in done.stderr, done.stderr[-2000:]


def test_a_production_worker_refuses_to_start_without_a_pin(stack_env, private_broker) -> None:  # type: ignore[no-untyped-def]
    production = {
        "DERMQ_ENVIRONMENT": "production",
        "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS": "false",
        "DERMQ_AUDIT_REQUIRE_RUNTIME_ROLE": "false",  # the test database's login: this test is the pin's
    }
    done = _start(stack_env, private_broker, **production)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "refusing to start: production serves a pinned model" in done.stderr, done.stderr[-2000:]


def test_a_child_loading_an_entry_edited_after_its_worker_started_fails_its_load(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from worker import runtime

    pinned = settings.model_copy(update={"model_sha256": SHIPPED})
    runtime.check_model_pin(pinned)  # the shipped entry, as pinned: served
    edited = pinned.model_copy(update={"model": str(_fewer_referrals(settings, tmp_path))})
    with pytest.raises(runtime.ModelUnavailable):
        runtime.load_predictor(edited, "cpu")


def test_a_manifest_replaced_after_the_pin_check_is_not_served(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The pin was checked against the file, then the load read the file again: a manifest replaced in
    # between (here: a referral threshold raised, the known answer unchanged) was served under the pin.
    from ml.predictor import Predictor
    from worker import runtime

    entry = tmp_path / "entry"
    shutil.copytree(registry.resolve(settings.model), entry)
    pinned = settings.model_copy(update={"model": str(entry), "model_sha256": registry.manifest_sha256(entry)})
    replacement = (_fewer_referrals(settings, tmp_path) / registry.MANIFEST).read_bytes()
    load = Predictor.load

    def replaced_then_loaded(*args, **kwargs):  # type: ignore[no-untyped-def]
        (entry / registry.MANIFEST).write_bytes(replacement)  # after check_model_pin, before the load reads it
        return load(*args, **kwargs)

    monkeypatch.setattr(Predictor, "load", replaced_then_loaded)
    with pytest.raises(runtime.ModelUnavailable):
        runtime.load_predictor(pinned, "cpu")
