"""ml.data: both HAM10000 layouts, and a split where no lesion straddles two parts."""

from __future__ import annotations

import csv
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from ml import data as ds
from ml.labels import CLASSES

FIELDS = ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization"]


def synthetic_samples(n_lesions: int = 1500, seed: int = 3) -> list[ds.Sample]:
    """HAM10000-like: skewed classes, one to six images per lesion."""
    rng = random.Random(seed)
    weights = [274, 430, 941, 95, 943, 5697, 119]
    samples = []
    for lesion in range(n_lesions):
        dx = rng.choices(CLASSES, weights)[0]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 6])):
            samples.append(ds.Sample(f"ISIC_{len(samples):07d}", f"HAM_{lesion:07d}", dx, Path("/nonexistent")))
    return samples


def test_split_keeps_every_lesion_in_one_part() -> None:
    samples = synthetic_samples()
    split = ds.SplitSpec(seed=7).apply(samples)
    parts = [{s.lesion_id for s in part} for part in (split.train, split.val, split.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(split.train) + len(split.val) + len(split.test) == len(samples)


def test_split_is_stratified_and_sized() -> None:
    samples = synthetic_samples()
    split = ds.SplitSpec(seed=7, val_fraction=0.15, test_fraction=0.15).apply(samples)
    total = Counter(s.dx for s in samples)
    for part in (split.val, split.test):
        counts = Counter(s.dx for s in part)
        for dx in CLASSES:
            assert abs(counts[dx] - 0.15 * total[dx]) <= max(6, 0.05 * total[dx]), dx
    assert 0.65 < len(split.train) / len(samples) < 0.75


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    samples = synthetic_samples()
    ids = lambda split: [s.image_id for s in split.test]  # noqa: E731
    one, two = ds.SplitSpec(seed=1), ds.SplitSpec(seed=2)
    assert ids(one.apply(samples)) == ids(one.apply(list(reversed(samples))))
    assert ids(one.apply(samples)) != ids(two.apply(samples))


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError):
        ds.SplitSpec(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError):
        ds.SplitSpec(val_fraction=0.0)


def test_a_split_spec_round_trips_through_its_manifest_record() -> None:
    spec = ds.SplitSpec(seed=7, val_fraction=0.3, test_fraction=0.2)
    record = spec.record()
    assert record == {
        "split": "lesion-level, stratified by diagnosis",
        "split_seed": 7,
        "val_fraction": 0.3,
        "test_fraction": 0.2,
    }
    assert ds.SplitSpec.from_record(record | {"digest": "ignored"}) == spec
    assert ds.SplitSpec.from_record({}) == ds.SHIPPED_SPLIT  # a manifest without the keys: the shipped split
    samples = synthetic_samples()
    assert ds.SplitSpec.from_record(record).apply(samples) == spec.apply(samples)


def _write_metadata(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def test_official_layout_with_two_image_parts(tmp_path: Path, fixture_images: dict[str, Path]) -> None:
    rows = list(csv.DictReader((Path(next(iter(fixture_images.values()))).parent / "metadata.csv").open()))
    for i, row in enumerate(rows):
        part = tmp_path / ("HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2")
        part.mkdir(exist_ok=True)
        shutil.copy(fixture_images[row["image_id"]], part)
    rows[0]["age"], rows[0]["sex"], rows[0]["localization"] = "", "unknown", "unknown"
    _write_metadata(tmp_path / "HAM10000_metadata.csv", rows)
    samples = ds.read_dataset(tmp_path)
    assert [s.image_id for s in samples] == [r["image_id"] for r in rows]
    assert samples[0].age is None and samples[0].sex == ds.UNKNOWN and samples[0].age_band == ds.UNKNOWN
    assert {s.path.parent.name for s in samples} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_unknown_diagnosis_is_an_error(tmp_path: Path) -> None:
    _write_metadata(tmp_path / "metadata.csv", [dict.fromkeys(FIELDS, "x") | {"dx": "scc"}])
    with pytest.raises(ValueError, match="scc"):
        ds.read_dataset(tmp_path)


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    _write_metadata(tmp_path / "metadata.csv", [dict.fromkeys(FIELDS, "x") | {"dx": "nv"}])
    with pytest.raises(FileNotFoundError):
        ds.read_dataset(tmp_path)


def test_age_bands() -> None:
    assert [ds.age_band(a) for a in (None, 5.0, 30.0, 50.0, 60.0, 85.0)] == [
        "unknown",
        "<30",
        "30-44",
        "45-59",
        "60-74",
        "75+",
    ]


def test_a_limited_runs_split_is_found_again_by_evaluation_export_and_the_drift_reference(
    synthetic_folder: Path,
) -> None:
    """A ``--limit`` run records the digest of the images it used; every reader rebuilt the split from
    the whole folder, found another digest and refused the run's own data ("not the data this model
    was trained on"): finalisation itself died at the drift reference, after the test figures."""
    from ml.evaluate import select_samples
    from ml.quantize import training_split

    samples = ds.read_dataset(synthetic_folder)
    used = ds.limited(samples, 60, 3)
    spec = ds.SplitSpec(val_fraction=0.25, test_fraction=0.25)
    split = spec.apply(used)
    manifest = {
        "data": {"digest": ds.dataset_digest(used), **spec.record()},
        "training": {"config": {"limit": 60, "seed": 3}},
    }
    ids = lambda part: [s.image_id for s in part]  # noqa: E731
    for part in ("val", "test"):
        assert ids(select_samples(manifest, synthetic_folder, part)[0]) == ids(getattr(split, part))
    assert select_samples(manifest, synthetic_folder, "auto")[1] == "test"
    assert ids(training_split(manifest, synthetic_folder).train) == ids(split.train)
    # another folder's lesions in neither the run's training nor its validation part: the unused ones too
    unseen = select_samples(manifest, synthetic_folder, "unseen", synthetic_folder)[0]
    held = {s.lesion_id for s in (*split.train, *split.val)}
    assert {s.lesion_id for s in unseen} == {s.lesion_id for s in samples} - held
