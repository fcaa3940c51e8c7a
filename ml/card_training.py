"""The model card's account of how an entry's weights were made (``## Training``): the recipe, a refit,
the teachers and what reproduces the run, in words built from the configuration its manifest records."""

from __future__ import annotations

import math
from typing import Any

from ml.augment import CROP_SPAN
from ml.recipe import TrainConfig


def figure(value: Any, digits: int = 3) -> str:
    """A figure as the card prints it: ``digits`` decimals for a float, ``n/a`` for a missing one."""
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def teacher_text(teacher: dict[str, Any]) -> str:
    if teacher.get("kind") == "unavailable":
        return f"a teacher whose work folder (`{teacher['source']}`) was no longer there when this entry was written"
    size = f"{teacher['input_size'][0]}x{teacher['input_size'][1]}"
    if teacher.get("kind") == "registry entry":
        return (
            f"the registry entry `{teacher['model_id']}` (`{teacher['arch']}` at {size}, weights SHA-256 "
            f"`{teacher['weights_sha256'][:16]}...`, test balanced accuracy "
            f"{figure(teacher['test_balanced_accuracy'])}; its raw logits, not its calibration)"
        )
    return (
        f"a `{teacher['arch']}` teacher ({teacher['initialisation']}) trained for {teacher['epochs']} epochs at "
        f"{size} with the same recipe (validation balanced accuracy "
        f"{figure(teacher['val_balanced_accuracy_last_epoch'])} after its last epoch, "
        f"{figure(teacher['minutes'], 1)} minutes)"
    )


def _pixels_read(stride: int) -> str:
    """What a gate with ``stride`` reads of the model input."""
    nth = {2: "second", 3: "third"}.get(stride, f"{stride}th")
    return "every pixel" if stride == 1 else f"every {nth} row and column"


def aspect(input_size: list[int]) -> str:
    """``width:height`` of an input of ``(height, width)``, in lowest terms: ``4:3`` for 168x224."""
    height, width = input_size
    common = math.gcd(width, height)
    return f"{width // common}:{height // common}"


def _sampling(power: float) -> str:
    """How training drew its images, for ``sample weight = 1 / class_count ** power``."""
    if power == 0:
        return "sampling in proportion to the classes' counts"
    named = {0.5: "square-root class-balanced", 1.0: "class-balanced"}
    return f"{named[power]} sampling" if power in named else f"class-balanced sampling (1 / count^{power:g})"


def _augmentation(config: dict[str, Any]) -> list[str]:
    """The recipe's sampling and augmentation in words, from the run's configuration (``ml.augment``;
    a key an older run lacks reads as today's default)."""
    strength = float(config.get("augment_strength", TrainConfig.augment_strength))
    words = [_sampling(float(config.get("balance_power", TrainConfig.balance_power)))]
    if config.get("rotate", TrainConfig.rotate):
        words.append("any-angle rotation")
    if strength > 0:  # ml.augment: the crop's area is drawn from [1 - 0.45 * strength, 1]
        words.append(f"crops of {100 * (1 - CROP_SPAN * strength):.0f}-100% of the area")
    words.append("flips")
    if strength > 0:
        words += ["colour and hue jitter", "blur and random erasing"]
    last_whole = config.get("last_epoch_whole", TrainConfig.last_epoch_whole)
    if last_whole and int(config.get("epochs", TrainConfig.epochs)) > 1:  # as ml.train decides it
        words.append("a last epoch on whole images")
    return words


def training_lines(training: dict[str, Any], prep: dict[str, Any]) -> list[str]:
    config = training["config"]
    teacher = training.get("teacher")
    env = training.get("environment") or {}
    lines = [
        f"Initialised from {training['initialisation']}. {training['epochs_run']} epochs on a fixed schedule "
        f"({figure(training['minutes'], 1)} minutes on {env.get('machine', 'a')} {env.get('device', 'cpu')}, "
        f"{env.get('precision', '')}), seed {training.get('seed')}; the shipped weights are the exponential moving "
        "average after the last epoch (no early stopping). Recipe: images through the serving decode and resize "
        f"({prep['input_size'][0]}x{prep['input_size'][1]}, {aspect(prep['input_size'])}, colour constancy "
        f"{prep.get('colour_constancy', 'none')}), " + ", ".join(_augmentation(config)) + "; AdamW "
        f"(lr {config.get('lr')}, weight decay {config.get('weight_decay')}) with warm-up and cosine decay to zero, "
        f"label smoothing {config.get('label_smoothing')}, dropout {config.get('drop_rate')}, stochastic depth "
        f"{config.get('drop_path_rate')}, {env.get('precision') or 'float32'}.",
    ]
    refit = training.get("refit_of")
    if refit:
        lines += [
            "",
            f"**Refit, not retrained**: these are `{refit['model_id']}`'s weights, unchanged (SHA-256 "
            f"`{refit['weights_sha256']}`), trained as described here. This entry serves them with the "
            f"`{refit['interpolation'][1]}` resampler (trained with `{refit['interpolation'][0]}`) and an "
            f"out-of-distribution gate reading {_pixels_read(refit['gate_stride'][1])} of the input "
            f"(`{refit['model_id']}`: {_pixels_read(refit['gate_stride'][0])}), so its calibration, decision rule, "
            "referral thresholds and gate were fitted again on the validation split and every figure below was "
            "measured again (`python -m ml.refit`); the training history is the source's.",
        ]
    teachers = training.get("teachers") or ([teacher] if teacher else [])
    if teachers:
        described = "; ".join(teacher_text(t) for t in teachers)
        combined = (
            "gives" if len(teachers) == 1 else "give, as the normalised geometric mean of their softened softmaxes,"
        )
        lines += [
            "",
            f"**Distillation**: {described} {combined} soft labels online, on the very crop the student sees; loss "
            f"= {1 - config.get('distill_alpha', 0):.1f} x cross-entropy + {config.get('distill_alpha')} x T^2 x "
            f"KL(teacher || student) at T = {config.get('distill_temperature')}. The served model keeps Lite0's cost.",
        ]
    code = env.get("code") or {}
    lines += [
        "",
        f"Reproducibility: torch {env.get('torch')}, timm {env.get('timm')}, numpy {env.get('numpy')}, Pillow "
        f"{env.get('pillow')}, onnxruntime {env.get('onnxruntime')}, Python {env.get('python')}; code commit "
        f"`{code.get('commit')}`{' with local changes' if code.get('modified') else ''}. The manifest records the "
        + (
            "SHA-256 of the source run's decoded training and validation pixels (`training.refit_of`) and its full "
            "configuration."
            if refit
            else "SHA-256 of the decoded training and validation pixels and the full configuration."
        ),
    ]
    return lines
