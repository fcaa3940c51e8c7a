"""The model registry: one folder per model, verified before anything in it is used.

An entry ``ml/registry/<model-id>/`` holds ``weights.safetensors``, ``manifest.json`` and
``model_card.md`` (with its plots). The manifest's ``files`` records the SHA-256 of every file a
model is loaded from (the weights, the ONNX graphs, the out-of-distribution gate, the verification
image); loading reads each once, hashes exactly those bytes and parses them only if the digest
matches, so a file swapped between check and use is still caught. Each is read only if it is a
regular file (:func:`read_file`): a name leading to a pipe or a device is refused unread. dermq's
model files are never pickles.

Not recorded in the entry: the manifest itself (the root the digests hang from). A deployment pins
it (``DERMQ_MODEL_SHA256``: :func:`check_pinned`, the manifest's own SHA-256, taken of the very
bytes a load parsed: :func:`load_manifest`), and a worker checks what the model answers once it is
loaded (:func:`ml.entry.check_known_answer`). Not checked: the model card, its plots, ``report.md``
and ``metrics.json``. Those are documents, except for one figure:
:func:`mel_sensitivity_floor` reads the field alert's melanoma-sensitivity floor from
``metrics.json`` unchecked, so an edited file moves that alert's threshold (never an answer). The
manifest's ``metrics.test.assessment`` holds the same figure (v3's and v4's do; v1's has none).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REGISTRY_DIR = Path(__file__).resolve().parent / "registry"
#: the entry served when nothing else is configured (core.config's DERMQ_MODEL default matches it)
DEFAULT_MODEL = "effnet-lite0-ham10000-v4"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
WEIGHTS = "weights.safetensors"
SCHEMA_VERSION = 1


class RegistryError(RuntimeError):
    """A registry entry is missing, malformed or fails its integrity check."""


class IntegrityError(RegistryError):
    """A file's SHA-256 differs from the one its manifest records (tampered or corrupted)."""


class KnownAnswerDiffers(RegistryError):
    """The loaded model does not give the answer its entry recorded for the entry's own verification
    image (:func:`ml.entry.check_known_answer`): the manifest, the engine or the device changed the answer.
    ``device``: the one it ran on (``cpu``, ``cuda``, ``cuda:1``)."""

    def __init__(self, message: str, device: str = "cpu") -> None:
        super().__init__(message)
        self.device = device


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_file(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file (a symlink to one is followed).

    Opened without blocking and checked before it is read: a name that leads to a pipe, a socket or a
    device would otherwise hang the reader (a FIFO with no writer) or fill its memory (``/dev/zero``)
    before any digest could refuse it. Raises :class:`RegistryError` for anything but a regular file
    and ``FileNotFoundError`` or another ``OSError`` as :func:`open` does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RegistryError(f"{path.parent.name}/{path.name} is not a regular file, so it is not read")
        return handle.read()


def resolve(model: str | Path) -> Path:
    """An entry's folder from a path, or from a model id under the packaged registry."""
    path = Path(model)
    if path.is_dir():
        return path
    candidate = REGISTRY_DIR / str(model)
    if candidate.is_dir() and "/" not in str(model) and str(model) not in ("", ".", ".."):
        return candidate
    raise RegistryError(f"no registry entry {model!r} (looked for a folder, then under {REGISTRY_DIR})")


def _manifest_bytes(folder: Path) -> bytes:
    """The bytes of ``folder``'s manifest, or :class:`RegistryError` saying why there are none."""
    try:
        return read_file(folder / MANIFEST)
    except FileNotFoundError:
        raise RegistryError(f"{folder} has no {MANIFEST}") from None
    except OSError as exc:
        raise RegistryError(f"{folder / MANIFEST} cannot be read ({type(exc).__name__})") from None


def load_manifest(entry: str | Path) -> tuple[dict[str, Any], str]:
    """The entry's manifest and the SHA-256 of the very bytes it was parsed from (one read of the file).

    What a model is loaded by: the pin is checked against this digest (:func:`check_pinned`'s
    ``actual``), and the files against this manifest (:func:`read_verified`'s ``manifest``), so a
    manifest replaced on disk after the pin check, or in the middle of a load, is never the one served."""
    folder = resolve(entry)
    path = folder / MANIFEST
    data = _manifest_bytes(folder)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise RegistryError(f"{path} is not a dermq manifest (schema_version {SCHEMA_VERSION})")
    return manifest, sha256_bytes(data)


def read_manifest(entry: str | Path) -> dict[str, Any]:
    return load_manifest(entry)[0]


def read_verified(entry: str | Path, artefact: str, *, manifest: dict[str, Any] | None = None) -> bytes:
    """The bytes of ``artefact`` (a key of the manifest's ``files``) after checking their SHA-256
    against ``manifest`` (default: the entry's manifest, read now). A load passes the manifest it
    parsed: reading the file again could check the artefact against another manifest than the one served."""
    folder = resolve(entry)
    if manifest is None:
        manifest = read_manifest(folder)
    files = manifest.get("files", {})
    if not isinstance(files, dict) or artefact not in files:
        raise RegistryError(f"{folder.name}: the manifest lists no {artefact!r} file")
    record = files[artefact]
    name = record.get("path") if isinstance(record, dict) else None
    if not isinstance(name, str) or not isinstance(record.get("sha256"), str):
        raise RegistryError(f"{folder.name}: the manifest's record of {artefact!r} needs a path and a sha256")
    if Path(name).name != name or name in ("", ".", ".."):
        raise RegistryError(f"{folder.name}: manifest file name {name!r} must be a file name, without a path")
    try:
        data = read_file(folder / name)
    except FileNotFoundError:
        raise RegistryError(f"{folder.name}: {name} is missing") from None
    except OSError as exc:
        raise RegistryError(f"{folder.name}: {name} cannot be read ({type(exc).__name__})") from None
    actual = sha256_bytes(data)
    if actual != record["sha256"]:
        raise IntegrityError(
            f"{folder.name}/{name} fails its integrity check: SHA-256 {actual[:16]}... but the manifest "
            f"records {record['sha256'][:16]}...; the file was altered or corrupted, so it is not loaded. "
            "Restore the entry from the repository or a trusted copy."
        )
    return data


def manifest_sha256(entry: str | Path) -> str:
    """The SHA-256 of the entry's ``manifest.json`` as it is on disk: what a deployment pins."""
    return sha256_bytes(_manifest_bytes(resolve(entry)))


def check_pinned(entry: str | Path, pinned: str, *, actual: str | None = None) -> None:
    """:class:`IntegrityError` unless the entry's manifest is the one pinned (its SHA-256). The file
    digests hang from the manifest, and the decision rule (calibration, the referral and uncertainty
    thresholds, the gate's) is written in it: an edit that keeps the verification image's answer, which
    the known-answer check cannot see, changes the pinned digest.

    ``actual``: the digest of the manifest bytes a predictor was loaded from
    (:attr:`ml.answers.ModelInfo.manifest_sha256`, from :func:`load_manifest`); without it, the file
    is read and hashed now, which says nothing about a manifest parsed before or after."""
    folder = resolve(entry)
    if actual is None:
        actual = manifest_sha256(folder)
    if actual != pinned:
        raise IntegrityError(
            f"{folder.name}/{MANIFEST} is not the pinned one: SHA-256 {actual[:16]}... where the deployment "
            f"pins {pinned[:16]}...; the manifest was edited or another entry is in its place, so the "
            "model is not loaded. Restore the entry, or pin the new manifest after `dermq model verify`."
        )


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_file(entry: Path, artefact: str, name: str, **extra: Any) -> dict[str, Any]:
    """Add (or refresh) ``name``'s digest in the manifest under ``files[artefact]``."""
    manifest = read_manifest(entry)
    path = entry / name
    record = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}
    manifest.setdefault("files", {})[artefact] = record
    write_json_atomic(entry / MANIFEST, manifest)
    return record


def entries(root: Path | None = None) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
    """Each folder under ``root`` (default: the packaged registry) with its manifest, or the reason it
    has none usable."""
    root = REGISTRY_DIR if root is None else root
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            yield folder, read_manifest(folder), None
        except RegistryError as exc:
            yield folder, None, str(exc)


def mel_sensitivity_floor(model_id: str, *, configured: str | Path | None = None) -> float | None:
    """The lower end of the 95% interval of melanoma sensitivity in a model's card (its entry's
    ``metrics.json``, ``assessment.per_image.mel_sensitivity.ci95``): the floor that the model's
    sensitivity on confirmed cases is held to. The entry is ``configured`` (the served one,
    ``DERMQ_MODEL``) when its manifest carries ``model_id``, else ``model_id``'s folder under the
    packaged registry; None when there is no such entry or figure. ``metrics.json`` is not among the
    files the manifest records, so this reads it without a digest check (see the module's docstring)."""
    folder: Path | None = None
    if configured is not None:
        try:
            candidate = resolve(configured)
            if read_manifest(candidate).get("model_id") == model_id:
                folder = candidate
        except RegistryError:
            pass
    if folder is None:
        if not model_id or "/" in model_id or "\\" in model_id or model_id in (".", ".."):
            return None
        folder = REGISTRY_DIR / model_id
    try:
        metrics = json.loads(read_file(folder / METRICS))
        floor = float(metrics["assessment"]["per_image"]["mel_sensitivity"]["ci95"][0])
    except (RegistryError, OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    # null (no melanoma in the test split), or NaN in a file written before: no floor, never a NaN one
    return floor if math.isfinite(floor) else None
