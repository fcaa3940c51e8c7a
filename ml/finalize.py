"""After training: calibrate on validation, choose the decision thresholds, write the registry entry,
evaluate the shipped (float16) weights on the held-out test split and write the model card.

Called by :mod:`ml.train` at the end of a run, or on its own with ``python -m ml.train ...
--finalize-only`` from the checkpoint a run left in its work folder.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import timm
import torch

from ml import calibration, registry
from ml import data as ds
from ml import model as models
from ml.decision import DecisionPolicy, fit_offsets, fit_referral_threshold
from ml.drift import reference_for_entry
from ml.entry import record_verification, save_entry
from ml.evaluate import evaluate_arrays, load_images, report_markdown, write_plots
from ml.labels import CLASSES
from ml.metrics import balanced_accuracy
from ml.modelcard import write_model_card
from ml.predictor import Predictor

if TYPE_CHECKING:
    from ml.train import TrainConfig

UNCERTAINTY_QUANTILE = 0.9
TARGET_REFERRAL_SENSITIVITY = 0.95
HEADLINE = ("n", "balanced_accuracy", "accuracy", "ece", "ece_uncalibrated", "macro_auc", "nll")


def _fit_policy(logits: np.ndarray, truth: np.ndarray, prior: np.ndarray) -> tuple[DecisionPolicy, dict[str, float]]:
    fitted = calibration.fit(logits, truth)
    policy = DecisionPolicy(calibration=fitted, prior=tuple(float(p) for p in prior))
    probabilities = policy.probabilities(logits)
    offsets = fit_offsets(probabilities, truth, policy.prior)
    policy = DecisionPolicy(calibration=fitted, prior=policy.prior, offsets=offsets)
    predicted = policy.labels(probabilities)
    uncertainty = policy.uncertainty(probabilities)
    policy = DecisionPolicy(
        calibration=fitted,
        prior=policy.prior,
        referral_threshold=fit_referral_threshold(probabilities, truth, predicted, TARGET_REFERRAL_SENSITIVITY),
        uncertainty_threshold=float(np.quantile(uncertainty, UNCERTAINTY_QUANTILE)),
        offsets=offsets,
    )
    score = {
        "nll": calibration.nll(probabilities, truth),
        "balanced_accuracy": balanced_accuracy(truth, predicted),
        "ece": calibration.expected_calibration_error(probabilities, truth),
    }
    return policy, score


def finalize(config: TrainConfig) -> Path:
    from ml.train import load_checkpoint, load_split

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(config.workdir)
    net = load_checkpoint(config)
    prep = models.preprocessing_for(net, tuple(config.input_size))  # type: ignore[arg-type]
    split = load_split(config)
    reduce_to = max(prep.input_size)
    print("finalize: decoding validation and test images", flush=True)
    val_images = load_images(split.val, reduce_to)
    test_images = load_images(split.test, reduce_to)
    val_truth = np.array([s.label for s in split.val])
    train_counts = np.bincount([s.label for s in split.train], minlength=len(CLASSES)).astype(float)
    prior = np.maximum(train_counts, 1) / np.maximum(train_counts, 1).sum()

    candidates: dict[str, tuple[DecisionPolicy, dict[str, float], np.ndarray]] = {}
    working = Predictor(net, prep, DecisionPolicy(), device="cpu", batch_size=64)
    for tta in ("none", "hflip"):
        working.tta = tta
        logits = working.logits(val_images)
        policy, score = _fit_policy(logits, val_truth, prior)
        candidates[tta] = (policy, score, logits)
        print(f"finalize: validation with tta={tta}: {json.dumps(score)}", flush=True)
    # Flips double the compute of every case: worth it only for a clear gain in the decisions.
    gain = candidates["hflip"][1]["balanced_accuracy"] - candidates["none"][1]["balanced_accuracy"]
    better_fit = candidates["hflip"][1]["nll"] < candidates["none"][1]["nll"]
    tta = "hflip" if gain >= 0.01 and better_fit else "none"
    policy, _, val_logits = candidates[tta]

    history = json.loads((workdir / "history.json").read_text()) if (workdir / "history.json").exists() else []
    all_samples = split.train + split.val + split.test
    save_entry(
        out,
        net,
        model_id=config.model_id,
        architecture=config.arch,
        preprocessing=prep,
        policy=policy,
        tta=tta,
        extra={
            "data": {
                "source": "HAM10000 development set (dermq shared/data/ham10000, 200x150 JPEGs); CC BY-NC 4.0",
                "digest": ds.dataset_digest(all_samples),
                "split": "lesion-level, stratified by diagnosis",
                "split_seed": config.split_seed,
                "val_fraction": config.val_fraction,
                "test_fraction": config.test_fraction,
                "summary": split.summary(),
            },
            "training": {
                "initialisation": models.IMAGENET_SOURCE if config.imagenet else "random",
                "epochs_run": len(history),
                "best_epoch": max(history, key=lambda r: r["val_balanced_accuracy"])["epoch"] if history else None,
                "minutes": history[-1]["minutes"] if history else None,
                "config": {
                    k: v
                    for k, v in json.loads((workdir / "config.json").read_text()).items()
                    if k not in ("finalize_only", "extra")
                },
                "environment": {
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                },
            },
        },
    )

    print("finalize: evaluating the shipped weights on the test split", flush=True)
    shipped = Predictor.load(out, device="cpu", batch_size=64)
    test_logits = shipped.logits(test_images)
    metrics, probabilities, _ = evaluate_arrays(split.test, test_logits, shipped.policy)
    test_truth = np.array([s.label for s in split.test])
    temperature_only = calibration.fit(val_logits, val_truth, with_bias=False)
    metrics["ece_temperature_only"] = calibration.expected_calibration_error(
        temperature_only.apply(test_logits), test_truth
    )
    metrics["temperature_only"] = temperature_only.temperature
    metrics.update({"model_id": config.model_id, "split": "test", "backend": "torch"})
    val_metrics, _, _ = evaluate_arrays(split.val, val_logits, policy)

    plots = write_plots(out, metrics, test_truth, probabilities)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    manifest = registry.read_manifest(out)
    manifest["metrics"] = {
        "test": {k: metrics[k] for k in HEADLINE}
        | {
            "ece_temperature_only": metrics["ece_temperature_only"],
            "per_class": metrics["per_class"],
            "referral": metrics["referral"],
        },
        "validation": {k: val_metrics[k] for k in HEADLINE} | {"referral": val_metrics["referral"]},
    }
    registry.write_json_atomic(out / registry.MANIFEST, manifest)
    (out / "report.md").write_text(report_markdown(metrics, f"{config.model_id}: held-out test split", plots))
    write_model_card(out, manifest, metrics, history)
    reference_for_entry(str(out), config.data)
    record_verification(out, split.test[0].path)
    print(
        json.dumps({k: metrics[k] for k in HEADLINE} | {"mel_sensitivity": metrics["per_class"]["mel"]["sensitivity"]}),
        flush=True,
    )
    return out
