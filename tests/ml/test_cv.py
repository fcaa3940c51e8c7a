"""ml.cv: lesion-grouped folds and the recipe table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ml import cv
from ml import data as ds
from ml.labels import CLASSES


def _samples() -> list[ds.Sample]:
    out = []
    for lesion in range(210):
        dx = CLASSES[lesion % 7]
        for shot in range(1 + lesion % 3):
            out.append(ds.Sample(f"ISIC_{lesion:04d}{shot}", f"HAM_{lesion:04d}", dx, Path("x.jpg")))
    return out


def test_folds_never_split_a_lesion_and_cover_everything_once() -> None:
    samples = _samples()
    folds = cv.lesion_folds(samples, 3, seed=7)
    lesions = [{s.lesion_id for s in fold} for fold in folds]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    assert sorted(s.image_id for fold in folds for s in fold) == sorted(s.image_id for s in samples)


def test_folds_are_stratified_and_deterministic() -> None:
    samples = _samples()
    folds = cv.lesion_folds(samples, 3, seed=7)
    for fold in folds:
        per_class = Counter(s.dx for s in {s.lesion_id: s for s in fold}.values())
        assert all(per_class[c] == 10 for c in CLASSES)  # 30 lesions per class, dealt round-robin
    assert cv.lesion_folds(samples, 3, seed=7) == folds
    assert cv.lesion_folds(samples, 3, seed=8) != folds


def test_summary_reports_mean_and_sd_per_recipe() -> None:
    results = [
        {"recipe": "a", "balanced_accuracy": b, "accuracy": 0.8, "minutes_per_epoch": 2.0} for b in (0.70, 0.74, 0.72)
    ] + [{"recipe": "b", "balanced_accuracy": b, "accuracy": 0.7, "minutes_per_epoch": 3.0} for b in (0.60, 0.62)]
    rows = cv.summarise(results)
    assert [r["recipe"] for r in rows] == ["a", "b"]
    assert rows[0]["balanced_accuracy_mean"] == pytest.approx(0.72)
    assert rows[0]["balanced_accuracy_sd"] == pytest.approx(0.02)
    table = cv.table(rows, epochs=3, folds=3)
    assert "| a | 3 | 0.720 ± 0.020 |" in table
