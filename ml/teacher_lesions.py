"""Which lesions a distillation teacher was trained on, and the refusal of one trained on a lesion the
student holds out.

A teacher's soft labels carry what it learned from its training images into the student. A teacher
trained under another split (``--split-seed 7`` against the shipped 20181, other fractions, another
``--limit``) has trained on lesions the student's split puts in validation or test, so the student's
calibration, decision thresholds and test figures would be fitted and measured on lesions it was taught.
:func:`refuse_leaking_teachers` reads each teacher's training part and refuses such a teacher (``ml.train``
calls it once the teachers have loaded, before any image is decoded):

- a registry entry: its manifest's ``data`` record (the data digest and the split spec) and its training
  configuration's ``limit`` and ``seed``, rebuilt from the student's ``--data``; an entry whose digest is
  not of that data (trained on another folder) is refused, as its lesions cannot be told;
- a work folder: the image ids its ``split.json`` lists as ``train``, whose lesions are read from the
  student's ``--data``; one that trained on images ``--data`` does not hold is refused likewise.

Lesions, not images, are compared: HAM10000 has several images of one lesion.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ml import data as ds
from ml import registry
from ml.recipe import TrainConfig

SPLIT_RECORD = "split.json"  # a work folder's parts, by image id (ml.train)


class UnknownTeacherLesions(ValueError):
    """Which lesions a teacher was trained on cannot be told from the student's data."""


def trained_lesions(source: str | Path, samples: Sequence[ds.Sample]) -> set[str]:
    """The lesion ids of the images the teacher at ``source`` (a registry entry or a finished run's work
    folder) was trained on, read against ``samples``: every labelled image of the student's ``--data``
    (before any ``--limit``). Raises :class:`UnknownTeacherLesions` where that cannot be told."""
    folder = Path(source)
    if (folder / registry.MANIFEST).is_file():
        return _entry_lesions(folder, samples)
    return _run_lesions(folder, samples)


def _entry_lesions(folder: Path, samples: Sequence[ds.Sample]) -> set[str]:
    manifest = registry.read_manifest(folder)
    info = manifest.get("data") or {}
    used = ds.used_samples(manifest, samples)
    try:
        ds.check_training_data(info, used, "the student's --data")
    except ValueError as exc:
        raise UnknownTeacherLesions(
            f"its manifest's data record is not of the student's --data, so the lesions it was trained on "
            f"cannot be told ({exc})"
        ) from None
    return {s.lesion_id for s in ds.SplitSpec.from_record(info).apply(used).train}


def _run_lesions(folder: Path, samples: Sequence[ds.Sample]) -> set[str]:
    record = folder / SPLIT_RECORD
    if not record.is_file():
        raise UnknownTeacherLesions(f"{record} is missing, so the images it was trained on cannot be told")
    trained = json.loads(record.read_text())["train"]
    lesion_of = {s.image_id: s.lesion_id for s in samples}
    unknown = [image_id for image_id in trained if image_id not in lesion_of]
    if unknown:
        raise UnknownTeacherLesions(
            f"it was trained on {len(unknown)} images the student's --data does not hold (e.g. {unknown[0]}), "
            "whose lesions cannot be told"
        )
    return {lesion_of[image_id] for image_id in trained}


def refuse_leaking_teachers(config: TrainConfig, split: ds.Split, sources: Iterable[str]) -> None:
    """``SystemExit`` naming the first of ``sources`` (the run's teachers) that was trained on a lesion of
    ``split``'s validation or test part, or whose training lesions cannot be told."""
    sources = list(sources)
    if not sources:
        return
    samples = ds.read_dataset(config.data)
    held_out = {s.lesion_id for s in (*split.val, *split.test)}
    for source in sources:
        try:
            leaked = trained_lesions(source, samples) & held_out
        except UnknownTeacherLesions as exc:
            raise SystemExit(
                f"teacher {source} refused: {exc}. Distil from a teacher trained on {config.data}"
            ) from None
        if leaked:
            raise SystemExit(
                f"teacher {source} was trained on {len(leaked)} lesions this run holds out for validation or test "
                f"(e.g. {', '.join(sorted(leaked)[:3])}): its soft labels would teach the student those lesions "
                "and inflate its calibration and test figures. Distil from a teacher trained with this run's "
                "split (the same --data, --split-seed, --val-fraction, --test-fraction, and --limit with its "
                "--seed), or from none"
            )
