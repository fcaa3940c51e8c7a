"""A student is never distilled from a teacher that trained on lesions the student holds out for
validation or test (``ml.teacher_lesions``): teachers here are bare manifests and work folders' split
records on the synthetic HAM10000-layout folder; nothing is trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ml import data as ds
from ml import registry, train
from ml.recipe import TrainConfig, load_split
from ml.teacher_lesions import refuse_leaking_teachers
from tests.ml.conftest import TINY_ARCH, save_tiny_entry

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"
V1 = registry.REGISTRY_DIR / "effnet-lite0-ham10000-v1"


def entry_teacher(folder: Path, samples: list[ds.Sample], spec: ds.SplitSpec, limit: int = 0, seed: int = 0) -> Path:
    """A registry entry's manifest as finalisation records its data and its run's limit and seed."""
    folder.mkdir(parents=True)
    used = ds.limited(samples, limit, seed)
    manifest = {
        "schema_version": registry.SCHEMA_VERSION,
        "data": {"digest": ds.dataset_digest(used), **spec.record()},
        "training": {"config": {"limit": limit, "seed": seed}},
    }
    (folder / registry.MANIFEST).write_text(json.dumps(manifest))
    return folder


def run_teacher(folder: Path, split: ds.Split) -> Path:
    """A finished run's work folder as ml.train leaves its split record."""
    folder.mkdir(parents=True)
    record = {name: [s.image_id for s in getattr(split, name)] for name in ("train", "val", "test")}
    (folder / "split.json").write_text(json.dumps(record))
    return folder


def student(data: Path, tmp_path: Path, teacher: Path, **options: Any) -> TrainConfig:
    return TrainConfig(
        data=str(data), out=str(tmp_path / "student"), workdir=str(tmp_path / "student.work"), teacher=str(teacher),
        **options,
    )  # fmt: skip


def refusal(config: TrainConfig) -> str:
    with pytest.raises(SystemExit) as raised:
        refuse_leaking_teachers(config, load_split(config), [config.teacher])
    return str(raised.value)


def test_training_under_another_split_refuses_an_entry_trained_on_its_held_out_lesions(
    synthetic_folder: Path, tmp_path: Path
) -> None:
    samples = ds.read_dataset(synthetic_folder)
    teacher = entry_teacher(tmp_path / "teacher", samples, ds.SHIPPED_SPLIT)
    # a loadable entry (tiny weights) that records the shipped split: training loads it, then refuses it
    loadable = save_tiny_entry(tmp_path / "loadable-v1")
    manifest = registry.read_manifest(loadable)
    manifest.update({k: v for k, v in registry.read_manifest(teacher).items() if k in ("data", "training")})
    registry.write_json_atomic(loadable / registry.MANIFEST, manifest)
    tiny = {"arch": TINY_ARCH, "imagenet": False, "input_size": (32, 32), "precision": "fp32", "threads": 1}
    with pytest.raises(SystemExit, match="lesions this run holds out for validation or test"):
        train.train(student(synthetic_folder, tmp_path, loadable, split_seed=7, **tiny))
    assert not (tmp_path / "student.work" / "pixels.json").exists()  # refused before an image was decoded
    # under the teacher's own split, every held-out lesion is one it never trained on
    same = student(synthetic_folder, tmp_path, teacher)
    refuse_leaking_teachers(same, load_split(same), [same.teacher])


def test_a_work_folder_teacher_is_judged_by_the_images_its_split_record_trained_on(
    synthetic_folder: Path, tmp_path: Path
) -> None:
    samples = ds.read_dataset(synthetic_folder)
    teacher = run_teacher(tmp_path / "teacher.work", ds.SHIPPED_SPLIT.apply(samples))
    assert "holds out" in refusal(student(synthetic_folder, tmp_path, teacher, split_seed=7))
    assert "holds out" in refusal(student(synthetic_folder, tmp_path, teacher, val_fraction=0.3))
    same = student(synthetic_folder, tmp_path, teacher)
    refuse_leaking_teachers(same, load_split(same), [same.teacher])


def test_a_teachers_limit_and_seed_are_those_its_manifest_records(synthetic_folder: Path, tmp_path: Path) -> None:
    samples = ds.read_dataset(synthetic_folder)
    teacher = entry_teacher(tmp_path / "teacher", samples, ds.SHIPPED_SPLIT, limit=60, seed=3)
    same = student(synthetic_folder, tmp_path, teacher, limit=60, seed=3)
    refuse_leaking_teachers(same, load_split(same), [same.teacher])
    # the whole folder splits otherwise: some of the teacher's 60 images are held out there
    assert "holds out" in refusal(student(synthetic_folder, tmp_path, teacher))


def test_a_teacher_whose_lesions_cannot_be_told_is_refused(synthetic_folder: Path, tmp_path: Path) -> None:
    samples = ds.read_dataset(synthetic_folder)
    other = entry_teacher(tmp_path / "other", samples[:-1], ds.SHIPPED_SPLIT)  # trained on other data
    assert "cannot be told" in refusal(student(synthetic_folder, tmp_path, other))
    split = ds.SHIPPED_SPLIT.apply(samples)
    elsewhere = ds.Split(train=[*split.train, ds.Sample("ISIC_0000000", "HAM_x", "nv", Path("x.jpg"))], val=[], test=[])
    stranger = run_teacher(tmp_path / "stranger.work", elsewhere)
    assert "ISIC_0000000" in refusal(student(synthetic_folder, tmp_path, stranger))
    assert "split.json is missing" in refusal(student(synthetic_folder, tmp_path, tmp_path / "nothing"))


@pytest.mark.skipif(not (DATA.is_dir() and V1.is_dir()), reason="needs the HAM10000 development set and v1")
def test_the_shipped_v1_teaches_only_under_the_split_it_was_trained_with(tmp_path: Path) -> None:
    assert "holds out" in refusal(student(DATA, tmp_path, V1, split_seed=7))
    shipped = student(DATA, tmp_path, V1)
    refuse_leaking_teachers(shipped, load_split(shipped), [shipped.teacher])
