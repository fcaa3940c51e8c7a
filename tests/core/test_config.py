"""core.config: one validated Settings object, refusing unsafe combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.config import Settings


def test_time_limits_must_nest_inside_the_visibility_timeout() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(task_soft_time_limit=60, task_time_limit=90, broker_visibility_timeout=60)
    with pytest.raises(ValidationError, match="task_soft_time_limit < task_time_limit"):
        Settings(task_soft_time_limit=90, task_time_limit=60)
    with pytest.raises(ValidationError, match="gradcam_budget_seconds"):
        Settings(gradcam_budget_seconds=120)


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


def test_only_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMQ_DATABASE_URL", "sqlite:///x.db")
    with pytest.raises(ValidationError, match="PostgreSQL"):
        Settings()


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
