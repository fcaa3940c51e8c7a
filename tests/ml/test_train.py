"""ml.train end to end on a small synthetic HAM10000-layout folder: a loadable, documented entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml import registry, train
from ml.labels import CLASSES
from ml.predictor import Predictor
from tests.ml.conftest import TINY_RUN


def test_training_writes_a_complete_entry(synthetic_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "registry" / "synthetic-v1"
    train.main(
        [
            "--data",
            str(synthetic_folder),
            "--out",
            str(out),
            "--arch",
            "test_efficientnet",
            "--no-imagenet",
            "--input-size",
            "32",
            "32",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--precision",
            "fp32",
            "--val-fraction",
            "0.25",
            "--test-fraction",
            "0.25",
        ]
    )
    manifest = registry.read_manifest(out)
    assert manifest["architecture"] == "test_efficientnet" and manifest["classes"] == list(CLASSES)
    assert manifest["preprocessing"]["input_size"] == [32, 32]
    assert {"mean", "std", "interpolation"} <= set(manifest["preprocessing"])
    assert manifest["decision"]["calibration"]["temperature"] > 0
    assert manifest["data"]["split_seed"] == 20181 and manifest["data"]["summary"]["test"]["images"] > 0
    assert {"balanced_accuracy", "ece", "per_class"} <= set(manifest["metrics"]["test"])
    assert manifest["version"] and manifest["created_at"]
    assert manifest["files"]["weights"]["sha256"] == registry.sha256_file(out / "weights.safetensors")

    workdir = Path(f"{out}.work")
    config = json.loads((workdir / "config.json").read_text())
    assert config["arch"] == "test_efficientnet" and config["epochs"] == 3
    split = json.loads((workdir / "split.json").read_text())
    lesions = {part: {image_id[:-1] for image_id in ids} for part, ids in split.items()}
    assert not lesions["train"] & lesions["test"] and not lesions["val"] & lesions["test"]
    assert len(json.loads((workdir / "history.json").read_text())) >= 1

    card = (out / "model_card.md").read_text()
    for heading in ("Intended use", "non-commercial", "Calibration", "Subgroups", "Known limits", "Referral"):
        assert heading in card
    # the referral figures as a clinic gets them, gate applied (the headline ones score every image)
    served = manifest["metrics"]["test"]["served"]
    shares = served["concerning_referred"] + served["concerning_gated"] + served["concerning_missed"]
    assert "As served, gate applied" in card and abs(shares - 1) < 1e-9
    for plot in ("confusion_matrix.png", "reliability.png", "roc.png"):
        assert (out / plot).is_file()

    predictor = Predictor.load(out, device="cpu")
    predictions = predictor.predict([Image.open(p) for p in sorted((synthetic_folder / "images").glob("*.jpg"))[:4]])
    assert len(predictions) == 4
    # Colours this distinct are learnable in three epochs: the model must beat chance clearly.
    assert manifest["metrics"]["test"]["balanced_accuracy"] > 0.4

    again = train.main(["--data", str(synthetic_folder), "--out", str(out), "--finalize-only"])
    assert again is None and registry.read_manifest(out)["model_id"] == "synthetic-v1"


def test_the_entry_records_its_gate_provenance_and_fitted_rule(synthetic_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "registry" / "synthetic-v2"
    train.main(["--data", str(synthetic_folder), "--out", str(out), "--epochs", "2", *TINY_RUN])
    manifest = registry.read_manifest(out)
    assert set(manifest["ood"]["thresholds"]) == {"contrast", "noise", "colour", "energy", "distance"}
    assert manifest["files"]["ood"]["sha256"] == registry.sha256_file(out / "ood.safetensors")
    environment = manifest["training"]["environment"]
    assert {"torch", "numpy", "pillow", "onnxruntime", "device", "precision", "code"} <= set(environment)
    assert len(manifest["data"]["pixels_sha256"]["train"]) == 64
    # at most one offset, melanoma's
    assert [c for c, v in manifest["decision"]["offsets"].items() if v] in ([], ["mel"])
    assessment = manifest["metrics"]["test"]["assessment"]
    low, high = assessment["per_image"]["balanced_accuracy"]["ci95"]
    assert low <= assessment["per_image"]["balanced_accuracy"]["value"] <= high
    assert assessment["lesions"] < assessment["images"]  # the folder has lesions with two images
    # a blank image is not a lesion: the shipped gate says so instead of giving a diagnosis
    blank = Predictor.load(out, device="cpu").predict([Image.new("RGB", (48, 40), (255, 255, 255))])[0]
    assert blank.out_of_distribution and "blank" in blank.ood_reasons


def _final_weights(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / train.CHECKPOINT))


def test_an_interrupted_run_resumes_to_the_same_weights(synthetic_folder: Path, tmp_path: Path) -> None:
    """Killed after its first epoch (SIGKILL, nothing flushed), the run resumes and ends exactly where an
    uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = ["--data", str(synthetic_folder), "--epochs", "6", *TINY_RUN]
    straight = tmp_path / "straight"
    train.train(train.parse_args([*base, "--out", str(straight)]))

    cut = tmp_path / "cut"
    code = "import sys; from ml.train import train, parse_args; train(parse_args(sys.argv[1:]))"
    args = [sys.executable, "-c", code, *base, "--out", str(cut)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    process = subprocess.Popen(args, cwd=Path(train.__file__).parents[1], env=env)
    history = Path(f"{cut}.work") / "history.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if history.exists() and json.loads(history.read_text() or "[]"):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    assert not (Path(f"{cut}.work") / train.CHECKPOINT).exists(), "the run finished before it could be cut"
    with pytest.raises(SystemExit, match="resume"):
        train.train(train.parse_args([*base, "--out", str(cut)]))
    train.train(train.parse_args([*base, "--out", str(cut), "--resume"]))

    a, b = _final_weights(Path(f"{straight}.work")), _final_weights(Path(f"{cut}.work"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(json.loads(history.read_text())) == 6


def test_a_student_learns_from_a_finished_teacher(synthetic_folder: Path, tmp_path: Path) -> None:
    base = ["--data", str(synthetic_folder), "--epochs", "2", *TINY_RUN]
    teacher = tmp_path / "teacher"
    train.train(train.parse_args([*base, "--out", str(teacher), "--input-size", "40", "40"]))
    student = tmp_path / "student"
    with pytest.raises(SystemExit, match="not finished"):
        train.train(train.parse_args([*base, "--out", str(student), "--teacher", str(tmp_path / "missing")]))
    config = train.parse_args([*base, "--out", str(student), "--teacher", f"{teacher}.work"])
    train.train(config)
    saved = json.loads((Path(f"{student}.work") / "config.json").read_text())
    assert saved["teacher"] == f"{teacher}.work" and saved["input_size"] == [32, 32]
    # the soft labels change what the student learns
    alone = tmp_path / "alone"
    train.train(train.parse_args([*base, "--out", str(alone)]))
    a, b = _final_weights(Path(f"{student}.work")), _final_weights(Path(f"{alone}.work"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    # a student served with another resampler than its teacher's learns on images made by its own
    import dataclasses
    import hashlib

    from ml.checkpoint import load_teacher
    from ml.preprocess import ANTIALIASED
    from ml.recipe import load_split

    own = train.parse_args([*base, "--out", str(tmp_path / "own"), "--teacher", f"{teacher}.work",
                            "--interpolation", ANTIALIASED])  # fmt: skip
    train.train(own)
    teacher_prep = load_teacher(f"{teacher}.work")[1]
    assert teacher_prep.interpolation != ANTIALIASED
    decoded = train.decode_samples(
        load_split(own).train, dataclasses.replace(teacher_prep, interpolation=ANTIALIASED), ""
    )
    digests = json.loads((Path(own.workdir) / "pixels.json").read_text())
    assert digests["train"] == hashlib.sha256(decoded.tobytes()).hexdigest()


@pytest.mark.slow
def test_a_student_learns_from_an_ensemble_of_an_entry_and_a_run(synthetic_folder: Path, tmp_path: Path) -> None:
    base = ["--data", str(synthetic_folder), "--epochs", "2", *TINY_RUN]
    entry = tmp_path / "registry" / "shipped-v1"
    train.main([*base, "--out", str(entry), "--input-size", "40", "40"])  # a finished, finalised entry
    run = tmp_path / "run"
    train.train(train.parse_args([*base, "--out", str(run)]))
    student = tmp_path / "registry" / "student-v1"
    train.main([*base, "--out", str(student), "--teacher", f"{entry},{run}.work"])
    teachers = registry.read_manifest(student)["training"]["teachers"]
    assert [t["kind"] for t in teachers] == ["registry entry", "training run"]
    assert teachers[0]["model_id"] == "shipped-v1" and teachers[0]["input_size"] == [40, 40]
    assert teachers[0]["weights_sha256"] == registry.read_manifest(entry)["files"]["weights"]["sha256"]
    assert "`shipped-v1`" in (student / "model_card.md").read_text()
    # the second teacher's soft labels count: the student differs from one taught by the entry alone
    single = tmp_path / "single"
    train.train(train.parse_args([*base, "--out", str(single), "--teacher", str(entry)]))
    a, b = _final_weights(Path(f"{student}.work")), _final_weights(Path(f"{single}.work"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    # a tampered entry is refused, not silently taught from
    (entry / "weights.safetensors").write_bytes(b"x" + (entry / "weights.safetensors").read_bytes()[1:])
    with pytest.raises(registry.RegistryError):
        train.train(train.parse_args([*base, "--out", str(tmp_path / "tampered"), "--teacher", str(entry)]))


def test_the_ensembles_soft_labels_are_the_normalised_geometric_mean() -> None:
    import torch

    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    one = train.ensemble_log_probs([a], 2.0)
    assert torch.allclose(one, torch.log_softmax(a / 2.0, dim=1))
    both = train.ensemble_log_probs([a, b], 2.0).exp()
    geometric = (torch.softmax(a / 2.0, dim=1) * torch.softmax(b / 2.0, dim=1)).sqrt()
    assert torch.allclose(both, geometric / geometric.sum(), atol=1e-6)
    assert torch.allclose(both.sum(), torch.tensor(1.0))


def test_recipes_set_defaults_that_options_override() -> None:
    teacher = train.parse_args(["--data", "d", "--out", "o/x", "--recipe", "v2-teacher"])
    assert teacher.arch == "tf_efficientnet_lite2" and teacher.input_size == (192, 256)
    overridden = train.parse_args(["--data", "d", "--out", "o/x", "--recipe", "v2-teacher", "--epochs", "2"])
    assert overridden.epochs == 2 and overridden.arch == "tf_efficientnet_lite2"
    student = train.parse_args(["--data", "d", "--out", "o/effnet-x"])
    assert student.input_size == (168, 224) and student.model_id == "effnet-x" and student.workdir == "o/effnet-x.work"
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "d", "--out", "o/x", "--recipe", "nonsense"])


def test_an_entrys_version_follows_its_model_id() -> None:
    from ml.finalize import entry_version

    assert entry_version("effnet-lite0-ham10000-v3") == "3.0.0"
    assert entry_version("effnet-lite0-ham10000-v12") == "12.0.0"
    assert entry_version("synthetic") == "1.0.0"


def test_a_teacher_whose_work_folder_is_gone_is_named_not_a_crash(tmp_path: Path) -> None:
    from ml.card_training import teacher_text
    from ml.finalize import _teacher_summary

    summary = _teacher_summary(str(tmp_path / "teacher.work"))
    assert summary == {"kind": "unavailable", "source": "teacher.work"}
    assert "`teacher.work`" in teacher_text(summary)
