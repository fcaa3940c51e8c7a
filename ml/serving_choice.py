"""Which ONNX graph an entry serves by default on the CPU: int8 only where it keeps fp32's answers.

Both graphs are run on the entry's **validation** split (the test split is read once, after every
choice, by :mod:`ml.finalize`); int8 becomes ``manifest["serving"]["default_backend"]`` only when its
balanced accuracy is within :data:`INT8_TOLERANCE` of fp32's, its most probable class agrees with
fp32's on at least :data:`MIN_TOP1_AGREEMENT` of images, it refers as often, and, for an entry with an
out-of-distribution gate, the gate refuses about the same images behind it: at most
:data:`OOD_TOLERANCE` more of the validation images than behind fp32, and the same verdict (flagged or
not) as behind fp32 on at least :data:`MIN_OOD_AGREEMENT` of them. The gate's energy and feature
distance thresholds were fitted on fp32 outputs; int8 moves both, and each validation image it flags
is a real lesion refused a diagnosis.
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
#: share of validation images the gate may flag behind int8 beyond those it flags behind fp32 (the
#: gate is fitted to flag about 1.5% of them: half a point more is a third more lesions refused)
OOD_TOLERANCE = 0.005
#: share of validation images on which the gate must give the same verdict behind int8 as behind fp32
MIN_OOD_AGREEMENT = 0.99


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
    flagged: dict[str, np.ndarray] = {}
    figures: dict[str, dict[str, float | None]] = {
        "balanced_accuracy": {},
        "referral_sensitivity": {},
        "mel_sensitivity": {},
        "ood_flagged": {},
    }
    images = None
    measured_int8 = None
    for name in ("onnx", "onnx-int8"):
        predictor = Predictor.load(entry, device="cpu", backend=name, threads=threads)
        measured_int8 = predictor.info.artefact_sha256  # the int8 graph's, after the last round
        if images is None:
            images = load_images(samples)
        gate = predictor.gate
        if gate is None:
            logits = predictor.logits(images)
            figures["ood_flagged"][name] = None
        else:  # the gate's verdicts as serving gives them: this graph's logits and pooled features
            outputs = predictor.outputs(images)
            logits = outputs.logits
            verdicts = gate.reasons(gate.scores(outputs.pixels, outputs.logits, outputs.features))
            flagged[name] = np.array([bool(reasons) for reasons in verdicts], dtype=bool)
            figures["ood_flagged"][name] = float(flagged[name].mean()) if len(samples) else None
        probabilities = predictor.policy.probabilities(logits)
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
        # the gate's verdict, flagged or not, image by image (None: the entry has no gate)
        "ood_agreement": float((flagged["onnx"] == flagged["onnx-int8"]).mean())
        if len(flagged) == 2 and len(samples)
        else None,
        # int8 sums round differently on CPUs without VNNI: these figures hold for this class of CPU only
        "int8_kernel": backend_choice.int8_kernel(),
        # and for this graph only: another one written later is not approved (ml.backend_choice)
        "onnx_int8_sha256": measured_int8,
    }


def decide_serving(comparison: dict[str, Any] | None, has_int8: bool) -> dict[str, Any]:
    """``manifest["serving"]``: int8 only when measured within :data:`INT8_TOLERANCE` of fp32 on held-out data,
    and with the out-of-distribution gate refusing about the same validation images behind it."""
    rule = (
        f"onnx-int8 if, on the validation split, its balanced accuracy is within {INT8_TOLERANCE} of onnx's, "
        f"its most probable class agrees with onnx's on at least {MIN_TOP1_AGREEMENT:.0%} of images, its "
        f"referral sensitivity is at most {INT8_TOLERANCE} lower, and (for an entry with an out-of-distribution "
        f"gate) the gate flags at most {OOD_TOLERANCE} more of the images behind it and gives onnx's verdict "
        f"on at least {MIN_OOD_AGREEMENT:.0%} of them; else onnx. Served as the default only on "
        "CPUs of the int8_kernel class it was measured on, and only the graph it was measured on (onnx_int8_sha256)"
    )
    serving: dict[str, Any] = {"default_backend": "onnx", "rule": rule}
    if comparison is None or not has_int8 or not comparison.get("n"):
        serving["reason"] = "no validation figures for int8 (no --data, or no validation images): fp32 ONNX"
    else:
        fp32, int8 = comparison["balanced_accuracy"]["onnx"], comparison["balanced_accuracy"]["onnx-int8"]
        referral = comparison["referral_sensitivity"]
        safe_referrals = referral["onnx"] is None or referral["onnx-int8"] >= referral["onnx"] - INT8_TOLERANCE
        agrees = (comparison["top1_agreement"] or 0.0) >= MIN_TOP1_AGREEMENT
        if int8 >= fp32 - INT8_TOLERANCE and agrees and safe_referrals and _gate_refuses_alike(comparison):
            serving["default_backend"] = "onnx-int8"
        else:
            serving["reason"] = "int8 fell short of the rule on held-out data: fp32 ONNX"
        serving.update(comparison)
    serving["decided_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return serving


def _gate_refuses_alike(comparison: dict[str, Any]) -> bool:
    """Whether the out-of-distribution gate flags about the images behind int8 that it flags behind
    fp32: at most :data:`OOD_TOLERANCE` more of them, the same verdict on :data:`MIN_OOD_AGREEMENT`.

    Vacuous for an entry without a gate (no shares: nothing is refused behind either graph)."""
    shares = comparison.get("ood_flagged") or {}
    fp32, int8 = shares.get("onnx"), shares.get("onnx-int8")
    if fp32 is None and int8 is None:
        return True
    if fp32 is None or int8 is None or comparison.get("ood_agreement") is None:
        return False
    return bool(int8 <= fp32 + OOD_TOLERANCE and comparison["ood_agreement"] >= MIN_OOD_AGREEMENT)
