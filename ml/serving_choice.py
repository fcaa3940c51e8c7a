"""Which ONNX graph an entry serves by default on the CPU: int8 only where it keeps fp32's answers.

Both graphs are run on the entry's **validation** split (the test split is read once, after every
choice, by :mod:`ml.finalize`); int8 becomes ``manifest["serving"]["default_backend"]`` only when its
balanced accuracy is within :data:`INT8_TOLERANCE` of fp32's, its most probable class agrees with
fp32's on at least :data:`MIN_TOP1_AGREEMENT` of images, and it refers as often.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml import backend_choice, backends, registry
from ml.labels import CLASSES

MIN_TOP1_AGREEMENT = 0.99
INT8_TOLERANCE = 0.01  # balanced accuracy int8 may lose against fp32 and still be the default


def compare_on_validation(
    model: str | Path, data: str | Path, *, threads: int = backends.DEFAULT_THREADS
) -> dict[str, Any]:
    """Balanced accuracy of fp32 and int8 ONNX on the entry's validation split, and their agreement.

    Validation, not test: the int8 choice is a modelling decision, and the test split is read once,
    after every decision is made."""
    from ml.decision import CONCERNING_INDEX
    from ml.evaluate import load_images, select_samples
    from ml.metrics import balanced_accuracy
    from ml.predictor import Predictor

    entry = registry.resolve(model)
    manifest = registry.read_manifest(entry)
    samples, _ = select_samples(manifest, data, "val")
    truth = np.array([s.label for s in samples])
    mel_index = CLASSES.index("mel")
    concerning, mel = np.isin(truth, CONCERNING_INDEX), truth == mel_index
    labels: dict[str, np.ndarray] = {}
    top: dict[str, np.ndarray] = {}
    figures: dict[str, dict[str, float | None]] = {
        "balanced_accuracy": {},
        "referral_sensitivity": {},
        "mel_sensitivity": {},
    }
    images = None
    for name in ("onnx", "onnx-int8"):
        predictor = Predictor.load(entry, device="cpu", backend=name, threads=threads)
        if images is None:
            images = load_images(samples)
        probabilities = predictor.policy.probabilities(predictor.logits(images))
        labels[name] = predictor.policy.labels(probabilities)
        top[name] = probabilities.argmax(axis=1)
        referred = predictor.policy.referrals(probabilities, labels[name])
        figures["balanced_accuracy"][name] = balanced_accuracy(truth, labels[name])
        # not part of the rule, recorded so that a loss where it matters most is visible
        figures["referral_sensitivity"][name] = float(referred[concerning].mean()) if concerning.any() else None
        figures["mel_sensitivity"][name] = float((labels[name][mel] == mel_index).mean()) if mel.any() else None
    return {
        "split": "val",
        "n": len(samples),
        **figures,
        # the most probable class, as the bar reads; and the label after the decision rule
        "top1_agreement": float((top["onnx"] == top["onnx-int8"]).mean()) if len(samples) else None,
        "label_agreement": float((labels["onnx"] == labels["onnx-int8"]).mean()) if len(samples) else None,
        # int8 sums round differently on CPUs without VNNI: these figures hold for this class of CPU only
        "int8_kernel": backend_choice.int8_kernel(),
    }


def decide_serving(comparison: dict[str, Any] | None, has_int8: bool) -> dict[str, Any]:
    """``manifest["serving"]``: int8 only when measured within :data:`INT8_TOLERANCE` of fp32 on held-out data."""
    rule = (
        f"onnx-int8 if, on the validation split, its balanced accuracy is within {INT8_TOLERANCE} of onnx's, "
        f"its most probable class agrees with onnx's on at least {MIN_TOP1_AGREEMENT:.0%} of images, and its "
        f"referral sensitivity is at most {INT8_TOLERANCE} lower; else onnx. Served as the default only on "
        "CPUs of the int8_kernel class it was measured on"
    )
    serving: dict[str, Any] = {"default_backend": "onnx", "rule": rule}
    if comparison is None or not has_int8 or not comparison.get("n"):
        serving["reason"] = "no validation figures for int8 (no --data, or no validation images): fp32 ONNX"
    else:
        fp32, int8 = comparison["balanced_accuracy"]["onnx"], comparison["balanced_accuracy"]["onnx-int8"]
        referral = comparison["referral_sensitivity"]
        safe_referrals = referral["onnx"] is None or referral["onnx-int8"] >= referral["onnx"] - INT8_TOLERANCE
        agrees = (comparison["top1_agreement"] or 0.0) >= MIN_TOP1_AGREEMENT
        if int8 >= fp32 - INT8_TOLERANCE and agrees and safe_referrals:
            serving["default_backend"] = "onnx-int8"
        else:
            serving["reason"] = "int8 fell short of the rule on held-out data: fp32 ONNX"
        serving.update(comparison)
    serving["decided_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return serving
