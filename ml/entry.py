"""Writing a registry entry from a trained torch model (the reading side is :mod:`ml.registry`)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ml import backends, registry
from ml.decision import DecisionPolicy
from ml.labels import CLASSES
from ml.model import Preprocessing
from ml.ood import OODGate


def save_entry(
    out: str | Path,
    model: nn.Module,
    *,
    model_id: str,
    architecture: str,
    preprocessing: Preprocessing,
    policy: DecisionPolicy,
    tta: str = "none",
    dtype: torch.dtype = torch.float16,
    version: str = "1.0.0",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``weights.safetensors`` (in ``dtype``) and ``manifest.json`` with the weights' SHA-256."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / registry.WEIGHTS), metadata={"format": "pt", "architecture": architecture})
    (out / registry.WEIGHTS).chmod(0o644)
    manifest: dict[str, Any] = {
        "schema_version": registry.SCHEMA_VERSION,
        "model_id": model_id,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": architecture,
        "classes": list(CLASSES),
        "preprocessing": preprocessing.to_dict(),
        "tta": tta,
        "decision": policy.to_dict(),
        "files": {},
        "metrics": {},
        **(extra or {}),
    }
    registry.write_json_atomic(out / registry.MANIFEST, manifest)
    registry.record_file(
        out, "weights", registry.WEIGHTS, dtype=str(dtype).removeprefix("torch."), format="safetensors"
    )
    return out


GATE_FILE = "ood.safetensors"


def save_gate(entry: str | Path, gate: OODGate, **details: Any) -> Path:
    """Ship ``gate`` with ``entry``: its arrays in ``ood.safetensors`` (SHA-256 in the manifest, like
    every file) and its description and thresholds, plus ``details``, in ``manifest["ood"]``."""
    from safetensors.numpy import save_file as save_numpy

    entry = registry.resolve(entry)
    save_numpy(gate.arrays(), str(entry / GATE_FILE))
    (entry / GATE_FILE).chmod(0o644)  # readable by the serving user, like every registry file
    manifest = registry.read_manifest(entry)
    manifest["ood"] = gate.describe() | details
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    registry.record_file(entry, "ood", GATE_FILE, format="safetensors")
    return entry


VERIFICATION_IMAGE = "verify.jpg"
VERIFICATION_TOLERANCE = 1e-3
#: an int8 graph's probabilities move by design (quantisation); its label must still match
INT8_TOLERANCE = 0.05


def record_verification(entry: str | Path, image_path: str | Path) -> dict[str, Any]:
    """Ship a known image with the entry and record what the model answers for it, so that
    ``dermq model verify`` can prove later that the deployed files still give the same answer."""
    from ml.images import decode

    entry = registry.resolve(entry)
    shutil.copyfile(image_path, entry / VERIFICATION_IMAGE)
    (entry / VERIFICATION_IMAGE).chmod(0o644)
    registry.record_file(entry, "verification_image", VERIFICATION_IMAGE)
    predictor = _predictor(entry, "torch")
    prediction = predictor.predict([decode((entry / VERIFICATION_IMAGE).read_bytes()).image])[0]
    manifest = registry.read_manifest(entry)
    manifest["verification"] = {
        "artefact": "verification_image",
        "backend": "torch",
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "tolerance": VERIFICATION_TOLERANCE,
    }
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    return manifest["verification"]


def verify_entry(entry: str | Path) -> list[tuple[str, bool, str]]:
    """Check an entry end to end: manifest, every file's SHA-256, then for torch and for every ONNX
    graph the entry ships (what CPU workers serve, whichever their CPU picks) that it loads and gives
    the recorded known answer (an int8 graph within :data:`INT8_TOLERANCE`).
    Returns (check, passed, detail) for each check; stops at the first failure that makes the rest
    meaningless."""
    checks: list[tuple[str, bool, str]] = []
    try:
        folder = registry.resolve(entry)
        manifest = registry.read_manifest(folder)
        described = f"{manifest.get('model_id', '(no model_id)')} version {manifest.get('version')}"
        checks.append(("manifest", True, described))
    except registry.RegistryError as exc:
        return [("manifest", False, str(exc))]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [*checks, ("files", False, "the manifest lists no files")]
    for artefact, record in files.items():
        name = record.get("path", artefact) if isinstance(record, dict) else artefact
        try:
            registry.read_verified(folder, artefact)  # the file's digest is the record's, or it raises
            checks.append((f"sha256 {name}", True, record["sha256"][:16]))
        except registry.RegistryError as exc:
            checks.append((f"sha256 {name}", False, str(exc)))
    if not all(ok for _, ok, _ in checks):
        return checks
    expected = manifest.get("verification")
    for backend in ("torch", *(name for name, (artefact, _) in backends.ONNX_FILES.items() if artefact in files)):
        suffix = "" if backend == "torch" else f" ({backend})"
        try:
            predictor = _predictor(folder, backend)
            checks.append((f"loads{suffix}", True, f"{manifest.get('architecture')} on {predictor.device}"))
        except Exception as exc:
            return [*checks, (f"loads{suffix}", False, f"{type(exc).__name__}: {exc}")]
        if not expected:
            return [*checks, ("known answer", False, "the entry records no verification image; see ml.entry")]
        try:
            tolerance = INT8_TOLERANCE if backend == "onnx-int8" else expected.get("tolerance", VERIFICATION_TOLERANCE)
            checks.append(_known_answer(folder, predictor, expected, suffix, tolerance))
        except (KeyError, TypeError, AttributeError) as exc:
            detail = f"the manifest's verification record is malformed ({type(exc).__name__}: {exc})"
            checks.append((f"known answer{suffix}", False, detail))
        except Exception as exc:  # the model fails on the image (an engine error the load did not foresee)
            checks.append((f"known answer{suffix}", False, " ".join(f"{type(exc).__name__}: {exc}".split())))
    return checks


def check_known_answer(entry: str | Path, predictor: Any, *, required: bool = False) -> None:
    """What a worker runs once it has loaded ``predictor`` from ``entry``, before it serves: the
    entry's verification image gives the answer the manifest the predictor was loaded from records
    (the same label, probabilities within :data:`VERIFICATION_TOLERANCE`, or a record's smaller
    tolerance; an int8 graph's within :data:`INT8_TOLERANCE`), or
    :class:`~ml.registry.KnownAnswerDiffers`.

    The digests prove the files are the ones recorded, not the manifest they hang from. What this
    catches: an edit that moves this image's label or probabilities (the input size, the
    preprocessing, the calibration), and an engine or a device that computes differently. What it
    does not: an edit that leaves this one image's answer as it was (a referral threshold, the gate's
    thresholds), or a manifest whose record was edited to match. ``required``: an entry that records no
    known answer is refused (production); else it passes (an entry written without one, in tests)."""
    folder = registry.resolve(entry)
    expected = predictor.info.manifest.get("verification")
    if not expected:
        if required:
            raise registry.RegistryError(f"{folder.name} records no known answer to check before serving")
        return
    try:
        recorded = min(float(expected.get("tolerance", VERIFICATION_TOLERANCE)), VERIFICATION_TOLERANCE)
        tolerance = INT8_TOLERANCE if predictor.backend.name == "onnx-int8" else recorded
        _, passed, detail = _known_answer(folder, predictor, expected, "", tolerance)
    except registry.RegistryError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise registry.RegistryError(f"{folder.name}: the manifest's verification record is malformed") from exc
    if not passed:
        on = str(predictor.device)
        raise registry.KnownAnswerDiffers(f"{folder.name} on {predictor.info.backend} ({on}): {detail}", on)


def _predictor(entry: Path, backend: str) -> Any:
    from ml.predictor import Predictor

    return Predictor.load(entry, device="cpu", backend=backend)


def _known_answer(
    folder: Path, predictor: Any, expected: dict[str, Any], suffix: str, tolerance: float
) -> tuple[str, bool, str]:
    """The recorded answer (torch's) against ``predictor``'s: the same label, probabilities within
    ``tolerance``."""
    from ml.images import decode

    # checked against the manifest the predictor was loaded from, which ``expected`` is part of
    image = decode(registry.read_verified(folder, expected["artefact"], manifest=predictor.info.manifest)).image
    got = predictor.predict([image])[0]
    worst = max(abs(got.probabilities[c] - expected["probabilities"][c]) for c in expected["probabilities"])
    passed = got.label == expected["label"] and worst <= tolerance
    detail = f"label {got.label} (expected {expected['label']}), largest probability difference {worst:.2e}"
    return f"known answer{suffix}", passed, detail
