"""Model rollout and drift: `dermq model list/verify`, and the drift report flagging shifted inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from core.db import session_scope
from core.models import Result
from ml import drift, registry
from ml.entry import record_verification
from tests import support

pytestmark = pytest.mark.usefixtures("database")


def dermq(settings, *args: str, model: str | None = None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_KEY_FILE": str(settings.key_file),
        "DERMQ_MODEL": model or settings.model,
    }
    return subprocess.run([*support.DERMQ, *args], capture_output=True, text=True, env=env, cwd=support.ROOT)


@pytest.fixture
def entry_copy(settings, tmp_path: Path, fixture_images) -> Path:  # type: ignore[no-untyped-def]
    copy = tmp_path / "candidate"
    shutil.copytree(registry.resolve(settings.model), copy)
    record_verification(copy, fixture_images["ISIC_0024313"])
    return copy


def test_model_list_marks_the_active_entry(settings) -> None:  # type: ignore[no-untyped-def]
    listed = dermq(settings, "model", "list", "--json")
    rows = json.loads(listed.stdout)
    active = [r for r in rows if r["active"]]
    assert len(active) == 1 and active[0]["id"] == settings.model and len(active[0]["weights_sha256"]) == 64


@pytest.mark.slow
def test_model_verify_passes_then_fails_on_a_tampered_entry(settings, entry_copy: Path) -> None:  # type: ignore[no-untyped-def]
    good = dermq(settings, "model", "verify", str(entry_copy))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "known answer" in good.stdout and "model verified" in good.stdout
    weights = entry_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x40
    weights.write_bytes(bytes(data))
    bad = dermq(settings, "model", "verify", str(entry_copy))
    assert bad.returncode == 1 and "FAIL  sha256 weights.safetensors" in bad.stdout
    assert "MODEL FAILED VERIFICATION" in bad.stdout
    # a mistyped id is bad input (exit 2, naming it), not a model that failed its checks
    typo = dermq(settings, "model", "verify", "effnet-lite0-ham10000-v9")
    assert typo.returncode == 2 and "no registry entry 'effnet-lite0-ham10000-v9'" in typo.stderr, typo.stderr
    assert "MODEL FAILED VERIFICATION" not in typo.stdout


def test_model_verify_loads_the_graph_cpu_workers_serve(settings, entry_copy: Path) -> None:  # type: ignore[no-untyped-def]
    good = dermq(settings, "model", "verify", str(entry_copy))
    assert "ok    known answer (onnx)" in good.stdout  # the shipped entry serves ONNX on the CPU
    # a graph that does not load, its digest recorded to match: torch alone would pass it
    (entry_copy / "model.onnx").write_bytes(b"not a graph" * 100)
    manifest = registry.read_manifest(entry_copy)
    manifest["files"]["onnx_fp32"]["sha256"] = registry.sha256_bytes(b"not a graph" * 100)
    registry.write_json_atomic(entry_copy / "manifest.json", manifest)
    bad = dermq(settings, "model", "verify", str(entry_copy))
    assert bad.returncode == 1 and "FAIL  loads (onnx)" in bad.stdout, bad.stdout + bad.stderr


@pytest.mark.slow
def test_model_verify_checks_an_int8_graph_within_its_own_tolerance(settings, entry_copy: Path, fixture_images) -> None:  # type: ignore[no-untyped-def]
    from ml.entry import INT8_TOLERANCE, VERIFICATION_TOLERANCE, verify_entry
    from ml.model import Preprocessing
    from ml.quantize import quantize_int8

    # the shipped entry's own known image, an unambiguous naevus: the fixture the copy records is a lesion
    # on the balanced rule's boundary (P(mel) 0.138-0.14 against nv's 0.84), where int8's rounding, which
    # moves probabilities by design, may move the label as well
    record_verification(entry_copy, registry.resolve(settings.model) / "verify.jpg")
    manifest = registry.read_manifest(entry_copy)
    calibration = [Image.open(path).convert("RGB") for path in sorted(fixture_images.values())]
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    quantize_int8(entry_copy / "model.onnx", entry_copy / "model.int8.onnx", calibration, prep, hflip=False)
    fp32 = manifest["files"]["onnx_fp32"]  # the int8 graph comes from the same weights and names the same head
    same = {k: v for k, v in fp32.items() if k not in ("path", "sha256", "bytes", "precision")}
    registry.record_file(entry_copy, "onnx_int8", "model.int8.onnx", precision="int8", **same)
    assert dermq(settings, "model", "verify", str(entry_copy)).returncode == 0
    checks = {name: passed for name, passed, _ in verify_entry(entry_copy)}
    assert checks["loads (onnx-int8)"] and checks["known answer (onnx-int8)"], checks
    # an int8 graph's probabilities move by design: held to its own tolerance, not fp32's 1e-3
    assert VERIFICATION_TOLERANCE < INT8_TOLERANCE
    recorded = registry.read_manifest(entry_copy)["verification"]
    label = recorded["label"]
    # moved by 0.01: ten times fp32's tolerance, a fifth of int8's (whose own difference here is about 0.02)
    recorded["probabilities"] = {
        c: p + (0.01 if c == label else -0.01 / 6) for c, p in recorded["probabilities"].items()
    }
    manifest = registry.read_manifest(entry_copy)
    manifest["verification"] = recorded
    registry.write_json_atomic(entry_copy / "manifest.json", manifest)
    moved = {name: passed for name, passed, _ in verify_entry(entry_copy)}
    assert not moved["known answer (onnx)"] and moved["known answer (onnx-int8)"], moved


def test_model_verify_catches_a_changed_answer(settings, entry_copy: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = registry.read_manifest(entry_copy)
    manifest["verification"]["probabilities"] = {c: 1 / 7 for c in manifest["verification"]["probabilities"]}
    registry.write_json_atomic(entry_copy / "manifest.json", manifest)
    result = dermq(settings, "model", "verify", str(entry_copy))
    assert result.returncode == 1 and "FAIL  known answer" in result.stdout


def _reference(rng: np.random.Generator, n: int = 400) -> tuple[list[dict[str, float]], list[str]]:
    stats = [
        {
            "brightness": float(rng.normal(150, 20)),
            "contrast": float(rng.normal(40, 8)),
            "megapixels": float(rng.choice([0.03, 0.03, 0.0675])),
        }
        for _ in range(n)
    ]
    labels = list(rng.choice(["nv"] * 14 + ["mel", "mel", "bkl", "bkl", "bcc", "akiec"], size=n))
    return stats, labels


def test_psi_is_quiet_on_the_reference_and_loud_on_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = drift.build_reference(*_reference(rng))
    same = drift.compare(reference, *_reference(rng, 300))
    assert same["drifted"] == [] and max(same["psi"].values()) < 0.1
    stats, labels = _reference(rng, 300)
    darker = [{**s, "brightness": s["brightness"] - 50} for s in stats]
    shifted = drift.compare(reference, darker, ["mel"] * 150 + labels[:150])
    assert set(shifted["drifted"]) == {"brightness", "label"} and shifted["psi"]["brightness"] > 1


def test_drift_report_over_the_database(settings, entry_copy: Path, tenant, store_case, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    model_id = f"drift-{uuid.uuid4().hex[:6]}"
    manifest = registry.read_manifest(entry_copy)
    manifest["model_id"] = model_id
    manifest["drift_reference"] = drift.build_reference(*_reference(rng))
    registry.write_json_atomic(entry_copy / "manifest.json", manifest)
    days = {"calm": datetime(2030, 1, 1, 12, tzinfo=UTC), "shifted": datetime(2030, 1, 2, 12, tzinfo=UTC)}
    for kind, when in days.items():
        stats, labels = _reference(rng, 120)
        if kind == "shifted":
            stats = [{**s, "megapixels": 12.0} for s in stats]  # camera-sized uploads
        with session_scope(settings) as session:
            for s, label in zip(stats, labels, strict=True):
                case_id = store_case(tenant, jpeg_bytes)
                session.add(support.diagnosis_row(case_id, label=label, model_id=model_id, input_stats=s))
            session.flush()
            session.execute(
                update(Result)
                .where(Result.model_id == model_id, Result.created_at < days["calm"])  # not yet moved
                .values(created_at=when)
            )
    calm = dermq(settings, "drift", "report", "--day", "2030-01-01", "--json", model=str(entry_copy))
    report = json.loads(calm.stdout)
    assert calm.returncode == 0 and report["n"] == 120 and report["drifted"] == []
    shifted = dermq(settings, "drift", "report", "--day", "2030-01-02", model=str(entry_copy))
    assert shifted.returncode == 1 and "megapixels" in shifted.stdout and "DRIFT" in shifted.stdout
    assert "status: drift" in shifted.stdout


def test_drift_report_for_a_model_without_a_drift_reference_is_one_error_line(settings, entry_copy: Path) -> None:  # type: ignore[no-untyped-def]
    """Right after a retraining the new entry may have no reference yet: the operator gets the
    registry's message (what to run), exit status 2, not a traceback."""
    manifest = registry.read_manifest(entry_copy)
    manifest.pop("drift_reference", None)
    registry.write_json_atomic(entry_copy / "manifest.json", manifest)
    done = dermq(settings, "drift", "report", model=str(entry_copy))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr and done.stdout == ""
