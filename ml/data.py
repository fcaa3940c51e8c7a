"""Reading a labelled HAM10000-layout folder and splitting it by lesion.

The layout is the official one: a ``metadata.csv`` or ``HAM10000_metadata.csv`` with at least the
columns ``image_id, lesion_id, dx`` (``age, sex, localization`` are used for subgroup figures when
present), and ``<image_id>.jpg`` files anywhere below the folder (``images/`` in dermq's development
copy, ``HAM10000_images_part_1/`` and ``_part_2/`` in the full release).

Several HAM10000 images show the same lesion, so every split is made over lesions: images of one
lesion never straddle train, validation and test. :class:`SplitSpec` is the one description of a
split (seed, fractions, grouping) that training, cross-validation, export and evaluation read.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ml.labels import CLASSES

METADATA_NAMES = ("metadata.csv", "HAM10000_metadata.csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Sample:
    image_id: str
    lesion_id: str
    dx: str
    path: Path
    sex: str = UNKNOWN
    age: float | None = None
    site: str = UNKNOWN

    @property
    def label(self) -> int:
        return CLASSES.index(self.dx)

    @property
    def age_band(self) -> str:
        return age_band(self.age)


def age_band(age: float | None) -> str:
    """Coarse age bands for subgroup figures (HAM10000 records age in 5-year steps)."""
    if age is None:
        return UNKNOWN
    if age < 30:
        return "<30"
    if age < 45:
        return "30-44"
    if age < 60:
        return "45-59"
    if age < 75:
        return "60-74"
    return "75+"


def _field(row: dict[str, str], name: str) -> str:
    value = (row.get(name) or "").strip()
    return value if value and value.lower() != UNKNOWN else UNKNOWN


def find_metadata(root: Path) -> Path:
    for name in METADATA_NAMES:
        candidate = root / name
        if candidate.is_file():
            return candidate
    found = [p for name in METADATA_NAMES for p in root.rglob(name)]
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"no {' or '.join(METADATA_NAMES)} under {root}" if not found else f"several metadata files under {root}"
    )


def read_dataset(root: str | Path) -> list[Sample]:
    """All labelled samples under ``root`` whose image file exists, in metadata order.

    Raises ``ValueError`` for an unknown diagnosis code and ``FileNotFoundError`` when no image of
    the metadata is found (a wrong folder, most likely).
    """
    root = Path(root)
    metadata = find_metadata(root)
    files: dict[str, Path] = {}
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.setdefault(path.stem, path)
    samples: list[Sample] = []
    with metadata.open(newline="") as handle:
        for row in csv.DictReader(handle):
            dx = row["dx"].strip()
            if dx not in CLASSES:
                raise ValueError(f"{metadata}: image {row['image_id']} has unknown diagnosis {dx!r}")
            found = files.get(row["image_id"].strip())
            if found is None:
                continue
            age_text = _field(row, "age")
            samples.append(
                Sample(
                    image_id=row["image_id"].strip(),
                    lesion_id=row["lesion_id"].strip(),
                    dx=dx,
                    path=found,
                    sex=_field(row, "sex"),
                    age=float(age_text) if age_text != UNKNOWN else None,
                    site=_field(row, "localization"),
                )
            )
    if not samples:
        raise FileNotFoundError(f"{metadata} lists no image found under {root}")
    return samples


@dataclass(frozen=True, slots=True)
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, part in (("train", self.train), ("val", self.val), ("test", self.test)):
            counts = Counter(s.dx for s in part)
            out[name] = {
                "images": len(part),
                "lesions": len({s.lesion_id for s in part}),
                **{c: counts.get(c, 0) for c in CLASSES},
            }
        return out


def group_lesions(samples: Iterable[Sample]) -> tuple[dict[str, list[Sample]], dict[str, list[str]]]:
    """(images by lesion id, lesion ids by diagnosis); a lesion counts under its first image's class."""
    by_lesion: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_lesion[sample.lesion_id].append(sample)
    by_class: dict[str, list[str]] = defaultdict(list)
    for lesion_id, images in by_lesion.items():
        by_class[images[0].dx].append(lesion_id)
    return by_lesion, by_class


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """How a labelled set is cut into train, validation and test parts.

    Grouping: by lesion (the images of one lesion never straddle two parts), stratified by diagnosis,
    with the lesions of each class shuffled by ``seed``. The defaults are the split every shipped
    model uses (:data:`SHIPPED_SPLIT`); training reads its spec from :class:`ml.recipe.TrainConfig`,
    and export, evaluation and the drift reference read the one a manifest records
    (:meth:`from_record`). Raises ``ValueError`` for fractions that leave no training part.
    """

    seed: int = 20181
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    #: the grouping, as a manifest's ``data.split`` names it
    GROUPING: ClassVar[str] = "lesion-level, stratified by diagnosis"

    def __post_init__(self) -> None:
        val, test = self.val_fraction, self.test_fraction
        if not 0 < val < 1 or not 0 < test < 1 or val + test >= 1:
            raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")

    def apply(self, samples: Sequence[Sample]) -> Split:
        """The split of ``samples``, deterministic for a given spec whatever their order.

        Within each class the lesions are shuffled and dealt out so that each part receives its share
        of that class's *images* (HAM10000 lesions have one to six images each). A lesion with images
        of two diagnoses (none in HAM10000) is assigned by its first image's class.
        """
        by_lesion, lesions_by_class = group_lesions(samples)
        rng = random.Random(self.seed)
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for dx in sorted(lesions_by_class):
            lesions = sorted(lesions_by_class[dx])
            rng.shuffle(lesions)
            total = sum(len(by_lesion[lesion]) for lesion in lesions)
            quota = {"test": self.test_fraction * total, "val": self.val_fraction * total}
            taken = {"test": 0, "val": 0}
            for lesion in lesions:
                images = by_lesion[lesion]
                for part in ("test", "val"):
                    if taken[part] + len(images) / 2 <= quota[part]:
                        parts[part].extend(images)
                        taken[part] += len(images)
                        break
                else:
                    parts["train"].extend(images)
        order = lambda s: s.image_id  # noqa: E731 - parts do not depend on the metadata's row order
        return Split(
            train=sorted(parts["train"], key=order),
            val=sorted(parts["val"], key=order),
            test=sorted(parts["test"], key=order),
        )

    def record(self) -> dict[str, Any]:
        """The keys a manifest's ``data`` section records this spec under."""
        return {
            "split": self.GROUPING,
            "split_seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }

    @classmethod
    def from_record(cls, info: Mapping[str, Any]) -> SplitSpec:
        """The spec a manifest's ``data`` section records; a key it lacks takes the shipped split's value."""
        shipped = cls()
        return cls(
            seed=int(info.get("split_seed", shipped.seed)),
            val_fraction=float(info.get("val_fraction", shipped.val_fraction)),
            test_fraction=float(info.get("test_fraction", shipped.test_fraction)),
        )


#: The lesion-level split every shipped model uses (its test part is read once, at the end).
SHIPPED_SPLIT = SplitSpec()


def limited(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """The images a run with ``--limit limit --seed seed`` uses of ``samples``: all of them for 0, else
    the first ``limit`` after a shuffle seeded with ``seed``."""
    if not limit:
        return samples
    rng = random.Random(seed)
    shuffled = sorted(samples, key=lambda s: s.image_id)
    rng.shuffle(shuffled)
    return shuffled[:limit]


def used_samples(manifest: Mapping[str, Any], samples: Sequence[Sample]) -> list[Sample]:
    """The images of ``samples`` that the run behind ``manifest`` read: all of them, or the ``--limit``
    subset its training configuration records. Its data digest and split are of these, so every reader
    that rebuilds its split (evaluation, export, the drift reference, a refit) starts from them."""
    config = (manifest.get("training") or {}).get("config") or {}
    return limited(list(samples), int(config.get("limit") or 0), int(config.get("seed") or 0))


def dataset_digest(samples: Iterable[Sample]) -> str:
    """SHA-256 over the (image id, lesion id, diagnosis) triples: identifies the data a model saw."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.image_id):
        digest.update(f"{s.image_id},{s.lesion_id},{s.dx}\n".encode())
    return digest.hexdigest()


def check_training_data(info: dict[str, Any], samples: Sequence[Sample], data: str | Path) -> None:
    """``ValueError`` unless ``samples`` (read from ``data``) are the data a model was trained on, as its
    manifest's ``data`` record says: the lesion-level split is rebuilt from the samples, and other data
    gives another split, whose validation and test parts hold lesions the weights were trained on."""
    if not info.get("digest"):
        raise ValueError("the manifest records no data digest, so its training split cannot be reproduced")
    digest = dataset_digest(samples)
    if digest != info["digest"]:
        raise ValueError(
            f"{data} is not the data this model was trained on (digest {digest[:12]}..., the manifest records "
            f"{info['digest'][:12]}...): its split would put training lesions in the held-out parts. Point "
            "--data at the training data"
        )
