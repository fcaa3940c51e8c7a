"""``dermq model``: the model registry (which entries exist, which one serves, whether an entry is intact).

ml is imported inside the commands: ``ml.entry`` loads torch, which ``dermq --help`` and the other
groups never need (the API image, which runs them, has no torch)."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.common import json_option
from core.config import get_settings


@click.group(help="model registry")
def model() -> None:
    pass


def _active_entry(model_setting: str) -> Any:
    """The folder DERMQ_MODEL names, resolved; None when it is not in the registry."""
    from ml import registry

    try:
        return registry.resolve(model_setting).resolve()
    except registry.RegistryError:
        return None


def _field(manifest: dict[str, Any], *keys: str) -> Any:
    """``manifest[k1][k2]...``; None where a level is missing or is not an object (a malformed manifest,
    which ``dermq model verify`` fails: the listing still shows every other entry)."""
    value: Any = manifest
    for name in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _serving_device(settings: Any) -> str:
    """``cuda`` or ``cpu``: what a worker on this host with these settings serves on, read as the
    worker reads it before its fork (DERMQ_DEVICE, or for ``auto`` the driver's device nodes), without torch."""
    from worker.runtime import cuda_device_present

    return "cuda" if cuda_device_present(settings) else "cpu"


def _auto_backend(manifest: dict[str, Any], device: str) -> str | None:
    """The backend ``auto`` serves the entry with on ``device`` (:func:`ml.backend_choice.choose`: the
    manifest's default only where its int8 figures hold for this CPU and graph); None for a manifest
    too malformed to tell, which ``dermq model verify`` fails."""
    from ml import backend_choice

    try:
        return backend_choice.choose(manifest, "auto", device)
    except (AttributeError, TypeError):  # a list or a string where an object belongs
        return None


def _rows(active: Any, device: str) -> list[dict[str, Any]]:
    from ml import registry

    rows = []
    for folder, manifest, error in registry.entries():
        row: dict[str, Any] = {"id": folder.name, "active": folder.resolve() == active, "error": error}
        if manifest is not None:
            row.update(
                {
                    "manifest_sha256": registry.manifest_sha256(folder),  # what DERMQ_MODEL_SHA256 pins
                    "version": manifest.get("version"),
                    "architecture": manifest.get("architecture"),
                    "created_at": manifest.get("created_at"),
                    "weights_sha256": _field(manifest, "files", "weights", "sha256"),
                    "balanced_accuracy": _field(manifest, "metrics", "test", "balanced_accuracy"),
                    # what DERMQ_BACKEND=auto serves on this host, and what the manifest asks for
                    "default_backend": _auto_backend(manifest, device),
                    "manifest_default_backend": _field(manifest, "serving", "default_backend"),
                }
            )
        rows.append(row)
    return rows


@model.command("list", help="registry entries; * marks the active one (DERMQ_MODEL)")
@json_option()
def list_models(as_json: bool) -> int:
    settings = get_settings()
    active = _active_entry(settings.model)
    rows = _rows(active, _serving_device(settings))
    if as_json:
        click.echo(json.dumps(rows))
        return 0
    for row in rows:
        mark = "*" if row["active"] else " "
        if row["error"]:
            click.echo(f"{mark} {row['id']}  UNUSABLE: {row['error']}")
            continue
        bacc, digest = row["balanced_accuracy"], row["weights_sha256"]
        line = (
            f"{mark} {row['id']}  v{row['version']}  {row['architecture']}  created {row['created_at']}  "
            f"test balanced accuracy {bacc:.3f}  sha256 {digest[:16]}..."
            if isinstance(bacc, float) and isinstance(digest, str)
            else f"{mark} {row['id']}  v{row['version']}"
        )
        click.echo(f"{line}  manifest sha256 {row['manifest_sha256']}")  # what DERMQ_MODEL_SHA256 pins
    if active is None:
        click.echo(f"(DERMQ_MODEL={settings.model} is not in the registry)")
    return 0


@model.command("verify", help="SHA-256, load and known answer of an entry (default: the active one)")
@click.argument("model_id", metavar="[MODEL]", required=False)
def verify(model_id: str | None) -> int:
    try:
        from ml.entry import verify_entry
    except ImportError as exc:  # the API's image ships no PyTorch: exit 1 would read "the model failed"
        raise click.UsageError(
            f"verifying loads the model, which needs PyTorch ({exc}): run it where the workers run "
            "(docker compose exec worker dermq model verify)"
        ) from None

    from ml import registry

    settings = get_settings()
    chosen = model_id or settings.model
    folder = registry.resolve(chosen)  # a mistyped id: exit 2 naming it, not "failed verification"
    checks = verify_entry(chosen)
    if settings.model_sha256 and folder.resolve() == _active_entry(settings.model):
        try:  # the workers' own check (worker.runtime.check_model_pin)
            registry.check_pinned(folder, settings.model_sha256)
            checks.append(("pinned", True, "manifest.json is the one DERMQ_MODEL_SHA256 pins"))
        except registry.IntegrityError:
            detail = "manifest.json is NOT the one DERMQ_MODEL_SHA256 pins: the workers will not serve it"
            checks.append(("pinned", False, detail))
    for name, passed, detail in checks:
        click.echo(f"{'ok  ' if passed else 'FAIL'}  {name}: {detail}")
    ok = all(passed for _, passed, _ in checks)
    click.echo("model verified" if ok else "MODEL FAILED VERIFICATION: do not deploy it")
    return 0 if ok else 1
