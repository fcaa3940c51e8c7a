"""Tiny timm models and registry entries for fast ml tests on the CPU."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ml import model as models
from ml.decision import DecisionPolicy
from ml.entry import save_entry
from ml.labels import CLASSES, NUM_CLASSES

TINY_ARCH = "test_efficientnet"  # global average pooling + linear head: the one-pass CAM path
TINY_HOOK_ARCH = "test_convnext"  # a head with a norm layer: the gradient (hook) path
TINY_SIZE = (128, 128)


def tiny_model(arch: str = TINY_ARCH, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = models.create(arch, NUM_CLASSES).eval()
    # timm zero-initialises some heads; spread the weights so every class has a non-trivial map.
    with torch.no_grad():
        net.get_classifier().weight.normal_(0.0, 1.0)
    return net


def tiny_prep(model: torch.nn.Module) -> models.Preprocessing:
    return models.preprocessing_for(model, TINY_SIZE)


def save_tiny_entry(path: Path, arch: str = TINY_ARCH, **options: Any) -> Path:
    """A registry entry at ``path`` (its name is the model id) holding :func:`tiny_model` of ``arch``;
    ``options`` go to :func:`ml.entry.save_entry` (dtype float32 unless given)."""
    net = tiny_model(arch)
    return save_entry(
        path,
        net,
        model_id=path.name,
        architecture=arch,
        preprocessing=tiny_prep(net),
        policy=DecisionPolicy(),
        **({"dtype": torch.float32} | options),
    )


@pytest.fixture
def tiny_entry(tmp_path: Path) -> Path:
    return save_tiny_entry(tmp_path / "tiny-v1")


@pytest.fixture(scope="session")
def fixture_pil(fixture_images: dict[str, Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in fixture_images.values()]


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


#: options of a tiny training run on :func:`synthetic_folder` (seconds, not hours)
TINY_RUN = ["--arch", "test_efficientnet", "--no-imagenet", "--input-size", "32", "32", "--batch-size", "8",
            "--lr", "3e-3", "--precision", "fp32", "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--threads", "1"]  # fmt: skip
