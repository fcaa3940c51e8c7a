"""ml.train end to end on a small synthetic HAM10000-layout folder: a loadable, documented entry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml import registry, train
from ml.labels import CLASSES
from ml.predictor import Predictor

COLOURS = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60), (200, 60, 200), (60, 200, 200), (120, 120, 120)]


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for c, code in enumerate(CLASSES):
        for lesion in range(12):
            for shot in range(1 + lesion % 2):
                image_id = f"ISIC_{c}{lesion:03d}{shot}"
                pixels = np.clip(rng.normal(COLOURS[c], 25, size=(40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg", quality=92)
                rows.append(
                    {
                        "image_id": image_id,
                        "lesion_id": f"HAM_{c}{lesion:03d}",
                        "dx": code,
                        "dx_type": "histo",
                        "age": str(20 + 5 * lesion),
                        "sex": ["male", "female"][lesion % 2],
                        "localization": "back",
                    }
                )
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


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
    for plot in ("confusion_matrix.png", "reliability.png", "roc.png"):
        assert (out / plot).is_file()

    predictor = Predictor.load(out, device="cpu")
    predictions = predictor.predict([Image.open(p) for p in sorted((synthetic_folder / "images").glob("*.jpg"))[:4]])
    assert len(predictions) == 4
    # Colours this distinct are learnable in three epochs: the model must beat chance clearly.
    assert manifest["metrics"]["test"]["balanced_accuracy"] > 0.4

    again = train.main(["--data", str(synthetic_folder), "--out", str(out), "--finalize-only"])
    assert again is None and registry.read_manifest(out)["model_id"] == "synthetic-v1"
