"""A training run's configuration: every default written once, the command line made from it.

``TrainConfig`` is the single home of the defaults; :func:`parse_args` builds ``python -m ml.train``'s
options from its fields (help text in each field's metadata). ``--recipe`` starts from one of the
named recipes in :data:`RECIPES`, and any option given on the command line overrides it. The split
options default to :data:`ml.data.SHIPPED_SPLIT` and make up :attr:`TrainConfig.split_spec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml import data as ds
from ml import model as models
from ml.preprocess import INTERPOLATIONS


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    data: str = _opt("", "HAM10000-layout folder (metadata.csv + images below it)", required=True)
    out: str = _opt("", "registry entry folder to write, e.g. ml/registry/<model-id>", required=True)
    workdir: str = _opt("", "checkpoints and logs (default: <out>.work)")
    recipe: str = _opt("v2-student", "named starting point (see ml.recipe.RECIPES); options override it")
    arch: str = _opt(models.DEFAULT_ARCH, "timm architecture name")
    imagenet: bool = _opt(True, "start from the offline ImageNet weights")
    input_size: tuple[int, int] = _opt((168, 224), "model input (height, width); 4:3 like HAM10000", nargs=2)
    colour_constancy: str = _opt("none", "none or shades_of_gray (shared by training and serving)")
    interpolation: str = _opt(
        "", "resampler to the input size (ml.preprocess); empty: the architecture's (timm)", choices=INTERPOLATIONS
    )
    gate_stride: int = _opt(1, "the out-of-distribution gate's image checks read every Nth row and column")
    epochs: int = _opt(10, "epochs, on a fixed schedule (no early stopping)")
    batch_size: int = _opt(32, "images per step")
    lr: float = _opt(4e-4, "peak learning rate (AdamW), after a linear warm-up, cosine to zero")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on biases and norms)")
    warmup_epochs: float = _opt(0.5, "linear warm-up length")
    label_smoothing: float = _opt(0.1, "label smoothing of the hard targets")
    drop_rate: float = _opt(0.2, "dropout before the classifier")
    drop_path_rate: float = _opt(0.1, "stochastic depth")
    augment_strength: float = _opt(1.0, "scales crop, aspect, colour, blur and erasing")
    rotate: bool = _opt(True, "any-angle rotations")
    last_epoch_whole: bool = _opt(True, "the last epoch sees whole images (flips and colour only)")
    ema_decay: float = _opt(0.998, "exponential moving average of the weights (what is evaluated and shipped)")
    balance_power: float = _opt(0.5, "sample weight = 1 / class_count ** power")
    teacher: str = _opt(
        "", "finished run's work folder or registry entry to distil (online); several, comma-separated, are ensembled"
    )
    distill_alpha: float = _opt(0.7, "weight of the teacher's soft labels in the loss")
    distill_temperature: float = _opt(2.0, "softmax temperature of the distillation term")
    precision: str = _opt("auto", "auto, fp32, bf16 or fp16 autocast", choices=["auto", "fp32", "bf16", "fp16"])
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = _opt(0, "seed of sampling, augmentation and initialisation (recorded in the manifest)")
    split_seed: int = _opt(ds.SHIPPED_SPLIT.seed, "seed of the lesion-level split")
    val_fraction: float = _opt(
        ds.SHIPPED_SPLIT.val_fraction, "share of images for validation (calibration, thresholds)"
    )
    test_fraction: float = _opt(ds.SHIPPED_SPLIT.test_fraction, "share of images for the held-out test split")
    limit: int = _opt(0, "use only this many images (smoke runs)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    model_id: str = _opt("", "registry id (default: the --out folder name)")
    resume: bool = _opt(False, "continue from the work folder's last checkpoint")
    cv_summary: str = _opt("", "folder of an ml.cv run whose table the model card records")
    finalize_only: bool = _opt(False, "skip training; calibrate and write the entry from the finished run")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    @property
    def split_spec(self) -> ds.SplitSpec:
        """The run's split: ``split_seed``, ``val_fraction`` and ``test_fraction`` as one spec."""
        return ds.SplitSpec(seed=self.split_seed, val_fraction=self.val_fraction, test_fraction=self.test_fraction)


#: Named recipes: overrides of the defaults above. "v1" is the first shipped model's recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "v1": {
        "input_size": (192, 192),
        "lr": 1e-3,
        "weight_decay": 0.02,
        "warmup_epochs": 1.0,
        "label_smoothing": 0.05,
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "rotate": False,
        "last_epoch_whole": False,
        "epochs": 11,
    },
    "v2-student": {},
    "v2-student-sog": {"colour_constancy": "shades_of_gray"},
    "v2-teacher": {"arch": "tf_efficientnet_lite2", "input_size": (192, 256), "drop_path_rate": 0.2, "epochs": 8},
}

#: What a finished run's work folder must agree on with ``--finalize-only`` and ``--resume``.
RUN_KEYS = (
    "arch",
    "input_size",
    "colour_constancy",
    "interpolation",
    "split_seed",
    "val_fraction",
    "test_fraction",
    "limit",
    "seed",
    "balance_power",
    "epochs",
    "lr",
    "batch_size",
    "teacher",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ml.train", description="Train a classifier and write a registry entry.")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        help_text = meta.pop("help")
        if f.type in ("bool", bool):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), int)
        p.add_argument(_flag(f.name), type=kind, default=None, help=help_text, **meta)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    recipe = args.get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], **args}
    if "input_size" in values:
        values["input_size"] = (int(values["input_size"][0]), int(values["input_size"][1]))
    config = TrainConfig(**values)
    config.workdir = config.workdir or f"{config.out.rstrip('/')}.work"
    config.model_id = config.model_id or Path(config.out).name
    return config


def write_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(asdict(config), indent=2))


def read_config(path: Path) -> dict[str, Any]:
    saved: dict[str, Any] = json.loads(path.read_text())
    saved["input_size"] = tuple(saved["input_size"])
    return saved


def check_same_run(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuse to resume or finalise a work folder made by a different run."""
    differ = [k for k in RUN_KEYS if k in saved and getattr(config, k) != saved[k]]
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} there, {getattr(config, k)!r} here" for k in differ)
        raise SystemExit(f"{config.workdir} holds another run ({detail})")


def load_split(config: TrainConfig) -> ds.Split:
    """The run's split of ``config.data`` (its first ``limit`` images, seeded, when ``limit`` is set)."""
    return config.split_spec.apply(ds.limited(ds.read_dataset(config.data), config.limit, config.seed))
