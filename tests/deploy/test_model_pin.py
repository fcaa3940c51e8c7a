"""Both deployments pin the model they serve: DERMQ_MODEL_SHA256 is the SHA-256 of DERMQ_MODEL's
manifest.json as shipped, so a worker refuses an entry whose manifest was edited (worker.runtime), and
a release that ships another manifest must pin it anew (this test fails until it does)."""

from __future__ import annotations

import pytest

from core.config import Settings
from ml import registry
from tests.deploy import manifests as m


def test_compose_and_kubernetes_pin_the_manifest_of_the_model_they_serve() -> None:
    compose = m.compose()["x-dermq-env"]
    configmap = m.configmap_data()
    for where, env in (("docker-compose.yml", compose), ("k8s/configmap.yaml", configmap)):
        assert env["DERMQ_MODEL"] == registry.DEFAULT_MODEL, where
        assert env["DERMQ_MODEL_SHA256"] == registry.manifest_sha256(env["DERMQ_MODEL"]), f"{where}: pin it anew"
        assert Settings(model_sha256=env["DERMQ_MODEL_SHA256"]).model_sha256 == env["DERMQ_MODEL_SHA256"]


def test_a_pin_is_a_sha256_digest_in_either_case() -> None:
    digest = registry.manifest_sha256(registry.DEFAULT_MODEL)
    assert Settings(model_sha256=f" {digest.upper()}\n").model_sha256 == digest  # Get-FileHash prints upper case
    for wrong in (digest[:-1], digest + "0", "sha256:" + digest, "x" * 64):
        with pytest.raises(ValueError, match="model_sha256"):
            Settings(model_sha256=wrong)
