"""After training: write the entry, fit every policy on the weights that ship, read the test split
once, and write the model card.

Order matters, and is the point of this module:

1. the final EMA weights are saved as float16 (what ships) and loaded back: every figure and every
   threshold below comes from those weights, in float32 on the CPU (the precision every backend
   serves: ``ml.backends``);
2. on the **validation** split only (weights never trained on it): calibration (temperature + class
   bias), the decision rule (balanced rule with at most a melanoma offset), the referral thresholds
   (at least 95% of mel/bcc/akiec referred) and the out-of-distribution gate's thresholds;
3. then, once, the **test** split: figures per image and per lesion with lesion-level bootstrap
   intervals, calibration of what is shown, subgroups; the gate on test lesions and on a built set
   of non-lesion inputs; the larger copies of test lesions (``--hires``) through the serving decode.

Called by :mod:`ml.train` at the end of a run, or with ``python -m ml.train ... --finalize-only``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml import calibration, ood, registry
from ml import data as ds
from ml import model as models
from ml.assess import assess, decision_figures
from ml.checkpoint import load_checkpoint, teacher_sources
from ml.decision import CONCERNING_INDEX, DecisionPolicy, fit_mel_offset, fit_referral_threshold
from ml.drift import reference_for_entry
from ml.entry import record_verification, save_entry, save_gate
from ml.evaluate import evaluate_arrays, load_images, report_markdown, write_plots
from ml.labels import CLASSES
from ml.metrics import served_referrals
from ml.provenance import describe_environment
from ml.recipe import load_split

if TYPE_CHECKING:
    from ml.recipe import TrainConfig

UNCERTAINTY_QUANTILE = 0.95
#: fitted with a margin over the 95% target: validation holds about 250 such images
TARGET_REFERRAL_SENSITIVITY = 0.96
HEADLINE = ("n", "balanced_accuracy", "accuracy", "ece", "ece_uncalibrated", "macro_auc", "nll")
HIRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-hires"


def fit_policy(logits: np.ndarray, truth: np.ndarray, prior: np.ndarray) -> DecisionPolicy:
    """Calibration, the label rule and the referral thresholds, all from validation data."""
    fitted = calibration.fit(logits, truth)
    base = DecisionPolicy(calibration=fitted, prior=tuple(float(p) for p in prior))
    probabilities = base.probabilities(logits)
    offsets = fit_mel_offset(probabilities, truth, base.prior)
    labelled = DecisionPolicy(calibration=fitted, prior=base.prior, offsets=offsets)
    predicted = labelled.labels(probabilities)
    uncertainty_threshold = float(np.quantile(labelled.uncertainty(probabilities), UNCERTAINTY_QUANTILE))
    # The referral threshold is fitted with the uncertainty rule in place, on what it leaves unreferred.
    uncertain = labelled.uncertainty(probabilities) >= uncertainty_threshold
    forced = np.where(uncertain, CLASSES.index("mel"), predicted)  # counts uncertain ones as referred
    return DecisionPolicy(
        calibration=fitted,
        prior=base.prior,
        referral_threshold=fit_referral_threshold(probabilities, truth, forced, TARGET_REFERRAL_SENSITIVITY),
        uncertainty_threshold=uncertainty_threshold,
        offsets=offsets,
    )


def _outputs(predictor: Any, samples: list[ds.Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return predictor.outputs(load_images(samples))


def finalize(config: TrainConfig) -> Path:
    from ml.predictor import Predictor

    out = Path(config.out)
    workdir = Path(config.workdir)
    split = load_split(config)
    trained = workdir / "split.json"
    if trained.exists() and json.loads(trained.read_text()) != {
        name: [s.image_id for s in getattr(split, name)] for name in ("train", "val", "test")
    }:  # another --data: its split would put lesions the weights were trained on in the held-out parts
        raise SystemExit(
            f"the split of {config.data} is not the one {workdir} was trained on; point --data at its data"
        )
    net = load_checkpoint(config)
    refit = json.loads((workdir / "refit.json").read_text()) if (workdir / "refit.json").exists() else None
    # a refit (ml.refit) serves the weights with its own resampler, not the one they were trained with
    interpolation = refit["interpolation"][1] if refit else config.interpolation
    prep = models.preprocessing_for(net, tuple(config.input_size), config.colour_constancy, interpolation)  # type: ignore[arg-type]
    history = json.loads((workdir / "history.json").read_text()) if (workdir / "history.json").exists() else []
    train_counts = np.bincount([s.label for s in split.train], minlength=len(CLASSES)).astype(float)
    prior = np.maximum(train_counts, 1) / np.maximum(train_counts, 1).sum()
    saved_config = json.loads((workdir / "config.json").read_text())
    pixels = json.loads((workdir / "pixels.json").read_text()) if (workdir / "pixels.json").exists() else {}

    # 1. the shipped weights (float16), loaded back through the registry like any worker does
    save_entry(out, net, model_id=config.model_id, architecture=config.arch, preprocessing=prep,
               policy=DecisionPolicy(), version=entry_version(config.model_id))  # fmt: skip
    shipped = Predictor.load(out, device="cpu", backend="torch", batch_size=64)

    # 2. validation only: calibration, decision, referral, out-of-distribution gate
    print("finalize: validation outputs and policies", flush=True)
    val_logits, val_features, val_pixels = _outputs(shipped, split.val)
    val_truth = np.array([s.label for s in split.val])
    policy = fit_policy(val_logits, val_truth, prior)
    print("finalize: training-image features for the out-of-distribution gate", flush=True)
    _, train_features, train_pixels = _outputs(shipped, split.train)
    gate = ood.fit(train_features, np.array([s.label for s in split.train]), train_pixels, val_pixels,
                   val_logits, val_features, stride=config.gate_stride)  # fmt: skip
    val_flagged = float(np.mean([bool(r) for r in gate.reasons(gate.scores(val_pixels, val_logits, val_features))]))

    manifest = registry.read_manifest(out)
    manifest["decision"] = policy.to_dict()
    manifest["data"] = {
        "source": "HAM10000 development set (dermq shared/data/ham10000, 200x150 JPEGs); CC BY-NC 4.0",
        "digest": ds.dataset_digest(split.train + split.val + split.test),
        "pixels_sha256": pixels,
        **config.split_spec.record(),
        "summary": split.summary(),
    }
    manifest["training"] = {
        "initialisation": models.IMAGENET_WEIGHTS[config.arch].source if config.imagenet else "random",
        "epochs_run": len(history),
        "minutes": history[-1]["minutes"] if history else None,
        "seed": config.seed,
        "config": {k: v for k, v in saved_config.items() if k not in ("finalize_only", "extra", "resume")},
        "teachers": [_teacher_summary(source) for source in teacher_sources(saved_config.get("teacher", ""))],
        "environment": _training_environment(workdir),
        "finalized_in": describe_environment(device="cpu", precision="float32"),
    }
    if refit:  # ml.refit: another entry's weights, fitted again (not trained)
        manifest["training"]["refit_of"] = refit
    manifest["cross_validation"] = _cross_validation(config)
    manifest["serving_precision"] = "float32 on every device: the precision every threshold was fitted in"
    registry.write_json_atomic(out / registry.MANIFEST, manifest)
    save_gate(out, gate, validation_flagged=val_flagged)
    shipped = Predictor.load(out, device="cpu", backend="torch", batch_size=64)

    # 3. the test split, read once
    print("finalize: evaluating the shipped weights on the test split", flush=True)
    test_logits, test_features, test_pixels = _outputs(shipped, split.test)
    metrics, probabilities, _ = evaluate_arrays(split.test, test_logits, policy)
    test_truth = np.array([s.label for s in split.test])
    temperature_only = calibration.fit(val_logits, val_truth, with_bias=False)
    metrics["ece_temperature_only"] = calibration.expected_calibration_error(
        temperature_only.apply(test_logits), test_truth
    )
    metrics["temperature_only"] = temperature_only.temperature
    metrics["assessment"] = assess(split.test, probabilities, policy)
    test_flags = gate.reasons(gate.scores(test_pixels, test_logits, test_features))
    metrics["ood"] = {"test_lesions_flagged": float(np.mean([bool(r) for r in test_flags]))}
    referred = policy.referrals(probabilities, policy.labels(probabilities))
    gated = np.array([bool(r) for r in test_flags])
    metrics["served"] = served_referrals(test_truth, referred, gated, CONCERNING_INDEX)
    metrics["ood"]["built_set"] = _ood_set(shipped, split.test)
    metrics["hires"] = _hires(shipped, config.data)
    metrics.update({"model_id": config.model_id, "split": "test", "backend": "torch (float32)"})
    val_figures = decision_figures(policy, policy.probabilities(val_logits), val_truth)
    val_metrics = {k: v if np.isfinite(v) else None for k, v in val_figures.items()}  # a class absent: null

    plots = write_plots(out, metrics, test_truth, probabilities)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    manifest = registry.read_manifest(out)
    manifest["metrics"] = {
        "test": {k: metrics[k] for k in HEADLINE}
        | {
            "ece_temperature_only": metrics["ece_temperature_only"],
            "per_class": metrics["per_class"],
            "referral": metrics["referral"],
            "assessment": metrics["assessment"],
            "ood": metrics["ood"],
            "served": metrics["served"],
        },
        "validation": val_metrics,
        "validation_note": "in sample: the decision policy (temperature, class bias, melanoma offset, uncertainty "
        "and referral thresholds) was fitted on these images; the test figures are the held-out ones",
    }
    registry.write_json_atomic(out / registry.MANIFEST, manifest)
    (out / "report.md").write_text(report_markdown(metrics, f"{config.model_id}: held-out test split", plots))
    from ml.modelcard import write_model_card

    write_model_card(out, manifest, metrics, history)
    reference_for_entry(str(out), config.data)
    record_verification(out, split.test[0].path)
    headline = metrics["assessment"]["per_image"]
    print(
        json.dumps({k: None if v["value"] is None else round(v["value"], 4) for k, v in headline.items()}), flush=True
    )
    return out


def entry_version(model_id: str) -> str:
    """``N.0.0`` for a model id ending in ``-vN`` (the registry's naming), else ``1.0.0``."""
    match = re.search(r"-v(\d+)$", model_id)
    return f"{int(match.group(1))}.0.0" if match else "1.0.0"


def _cross_validation(config: TrainConfig) -> dict[str, Any] | None:
    """The ml.cv table the recipe was chosen from, for the model card."""
    if not config.cv_summary or not (Path(config.cv_summary) / "summary.md").exists():
        return None
    lines = (Path(config.cv_summary) / "summary.md").read_text().strip().splitlines()
    return {
        "lines": lines,
        "rows": json.loads((Path(config.cv_summary) / "summary.json").read_text()),
        "choice": (
            f"Shipped recipe: `{config.recipe}`. Rule, fixed before the folds were run: Shades of Gray colour "
            "constancy only if its mean gain over the paired folds exceeds the spread (sd) of those differences; "
            "the cross-validation runs use no teacher, the shipped student does."
        ),
    }


def _training_environment(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "environment.json"
    return json.loads(path.read_text()) if path.exists() else None


def _teacher_summary(source: str) -> dict[str, Any]:
    """What the model card says of one teacher: a training run's recipe and last validation figure,
    or a registry entry's id, digest and recorded test figures."""
    folder = Path(source)
    if (folder / registry.MANIFEST).is_file():
        entry = registry.read_manifest(folder)
        metrics = entry.get("metrics", {})
        return {
            "kind": "registry entry",
            "model_id": entry["model_id"],
            "arch": entry["architecture"],
            "input_size": entry["preprocessing"]["input_size"],
            "weights_sha256": entry["files"]["weights"]["sha256"],
            "test_balanced_accuracy": metrics.get("test", {}).get("balanced_accuracy"),
        }
    if not (folder / "config.json").is_file():  # a run's work folder removed since it taught
        return {"kind": "unavailable", "source": folder.name}
    teacher = json.loads((folder / "config.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    return {
        "kind": "training run",
        "arch": teacher["arch"],
        "input_size": teacher["input_size"],
        "epochs": teacher["epochs"],
        "minutes": history[-1]["minutes"] if history else None,
        "val_balanced_accuracy_last_epoch": history[-1]["val_balanced_accuracy"] if history else None,
        "initialisation": (
            models.IMAGENET_WEIGHTS[teacher["arch"]].source
            if teacher.get("imagenet", True) and teacher["arch"] in models.IMAGENET_WEIGHTS
            else "random"
        ),
    }


def _ood_set(predictor: Any, test: list[ds.Sample]) -> dict[str, Any]:
    """The gate on the built non-lesion set (``ml.oodset``): share flagged, per kind."""
    from ml import oodset

    rng = np.random.default_rng(0)
    chosen = [test[i] for i in sorted(rng.choice(len(test), size=min(60, len(test)), replace=False))]
    items = oodset.build(load_images(chosen))
    flagged = [p.out_of_distribution for p in predictor.predict([image for _, image in items])]
    kinds = np.array([kind for kind, _ in items])
    hits = np.array(flagged, dtype=bool)
    return {
        "n": len(items),
        "flagged": float(hits.mean()),
        "per_kind": {
            k: {"n": int((kinds == k).sum()), "flagged": float(hits[kinds == k].mean())} for k in oodset.KINDS
        },
    }


def _hires(predictor: Any, data: str) -> dict[str, Any] | None:
    """Labels of the larger copies (300x225) against the 200x150 ones, through the serving decode."""
    from ml.images import ImageLimits
    from ml.served_decode import decode_as_served

    if not HIRES.is_dir():
        return None
    try:
        large = ds.read_dataset(HIRES)
    except FileNotFoundError:
        return None
    small = {s.image_id: s for s in ds.read_dataset(data)}
    pairs = [(s, small[s.image_id]) for s in large if s.image_id in small]
    if not pairs:
        return None
    limits = ImageLimits()
    big = predictor.predict([decode_as_served(s.path.read_bytes(), limits).image for s, _ in pairs])
    little = predictor.predict([decode_as_served(t.path.read_bytes(), limits).image for _, t in pairs])
    truth = [s.dx for s, _ in pairs]
    return {
        "n": len(pairs),
        "label_changed": float(np.mean([a.label != b.label for a, b in zip(big, little, strict=True)])),
        "accuracy_large": float(np.mean([p.label == t for p, t in zip(big, truth, strict=True)])),
        "accuracy_small": float(np.mean([p.label == t for p, t in zip(little, truth, strict=True)])),
        "note": "the larger copies are of lesions from every split, training included: a consistency check, "
        "not a held-out figure",
    }
