"""The model card of a registry entry (Mitchell et al. 2019), written from its manifest and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ml.decision import MEL_FLOOR
from ml.labels import DIAGNOSES


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _subgroup_table(groups: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| group | n | balanced acc. | accuracy | mel n | mel sensitivity | referral sens. | ECE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for value, row in groups.items():
        lines.append(
            f"| {value} | {row['n']} | {_f(row['balanced_accuracy'])} | {_f(row['accuracy'])} | {row['mel_n']} | "
            f"{_f(row['mel_sensitivity'])} | {_f(row['referral_sensitivity_concerning'])} | {_f(row['ece'])} |"
        )
    return lines


def _offset_lines(decision: dict[str, Any]) -> list[str]:
    offsets = decision.get("offsets")
    if not offsets or not any(offsets.values()):
        return []
    listed = ", ".join(f"{code} {value:+.1f}" for code, value in offsets.items())
    return [
        "- **Per-class offsets** added to that log ratio before the argmax: "
        f"{listed}. Tuned on the validation split to maximise balanced accuracy while keeping melanoma "
        f"sensitivity at or above {_f(decision.get('mel_floor', MEL_FLOOR), 2)} (a penalty below it), with a small "
        "penalty on their size.",
    ]


def _notes(manifest: dict[str, Any]) -> list[str]:
    notes = manifest.get("notes") or []
    if not notes:
        return []
    return ["", "## Targets and development notes", "", *[f"- {note}" for note in notes]]


def write_model_card(
    entry: Path, manifest: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]]
) -> Path:
    decision = manifest["decision"]
    prep = manifest["preprocessing"]
    data = manifest["data"]
    training = manifest["training"]
    summary = data["summary"]
    referral = metrics["referral"]
    lines = [
        f"# Model card: {manifest['model_id']} (version {manifest['version']})",
        "",
        f"Created {manifest['created_at']}. Architecture `{manifest['architecture']}` (timm), "
        f"input {prep['input_size'][0]}x{prep['input_size'][1]} RGB "
        f"({prep['resize']} resize, {prep['interpolation']}), "
        f"normalised with mean {prep['mean']} and std {prep['std']}. Weights: `weights.safetensors` (float16), "
        f"SHA-256 `{manifest['files']['weights']['sha256']}`.",
        "",
        "## Intended use",
        "",
        "Decision support for clinicians triaging **dermoscopy** images of single skin lesions into the seven",
        "HAM10000 classes. It is **not a diagnosis** and must not be used without a clinician's review, nor to",
        "rule out melanoma on its own. Every answer carries calibrated probabilities, an uncertainty figure and",
        "a referral flag; a referral means a clinician should look at the lesion, not that it is malignant.",
        "",
        "Out of scope: clinical (non-dermoscopic) photographs, histopathology, mucosal or nail lesions,",
        "images of several lesions, children (few in the data), and any class outside the seven below.",
        "",
        "| code | diagnosis | group |",
        "| --- | --- | --- |",
        *[f"| {d.code} | {d.name} | {d.group.value} |" for d in DIAGNOSES],
        "",
        "## Data and licence",
        "",
        f"{data['source']}. Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of",
        "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018),",
        "doi:10.1038/sdata.2018.161.",
        "",
        "**Licence: CC BY-NC 4.0 (non-commercial).** This model is derived from HAM10000 and inherits the",
        "restriction: it may not be used commercially.",
        "",
        f"Split: {data['split']}, seed {data['split_seed']} (no lesion appears in two parts); data digest "
        f"`{data['digest'][:16]}...`.",
        "",
        "| part | images | lesions | " + " | ".join(d.code for d in DIAGNOSES) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in DIAGNOSES) + " |",
        *[
            f"| {part} | {row['images']} | {row['lesions']} | " + " | ".join(str(row[d.code]) for d in DIAGNOSES) + " |"
            for part, row in summary.items()
        ],
        "",
        "## Training",
        "",
        f"Initialised from {training['initialisation']}. {training['epochs_run']} epochs "
        f"({_f(training['minutes'], 1)} minutes on {training['environment']['machine']} CPU), best validation "
        f"balanced accuracy at epoch {training['best_epoch']}; the shipped weights are the exponential moving "
        "average at that epoch. Recipe: square-root class-balanced sampling, random resized crops, flips, "
        "90-degree rotations, colour jitter, AdamW with warm-up and cosine decay, label smoothing, bf16 autocast. "
        "The full configuration is in `manifest.json`.",
        "",
        "## Decision rule, calibration and referral",
        "",
        f"- **Probabilities**: softmax(logits / T + b) with T = {_f(decision['calibration']['temperature'])} and a "
        "per-class bias b, fitted on the validation split by negative log-likelihood (temperature scaling with a "
        "prior-shift term). They are calibrated for HAM10000's class mix.",
        "- **Label**: the class with the largest calibrated probability divided by its training prevalence (the "
        "Bayes rule for balanced error). It can differ from the most probable class: a lesion with P(mel) = 0.3 "
        "and P(nv) = 0.6 may be labelled mel, because 0.3 is far above melanoma's base rate. `confidence` is the "
        "label's own probability.",
        *_offset_lines(decision),
        f"- **Test-time augmentation**: {manifest['tta']} (chosen on validation negative log-likelihood).",
        "- **Uncertainty**: predictive entropy of the calibrated probabilities divided by log 7 (0 = certain, "
        "1 = uniform).",
        "- **Referral** (`referral = true`) when any of: the label is mel, bcc or akiec; "
        f"P(mel) + P(bcc) + P(akiec) >= {_f(decision['referral_threshold'], 2)} (the highest threshold that "
        "referred at least 95% of malignant and pre-malignant validation lesions); uncertainty >= "
        f"{_f(decision['uncertainty_threshold'])} (the most uncertain 10% of validation images).",
        "",
        "## Results on the held-out test split",
        "",
        f"{metrics['n']} images of lesions never seen in training or validation, evaluated with the shipped "
        "float16 weights.",
        "",
        f"- Balanced multiclass accuracy (ISIC 2018 Task 3 metric): **{_f(metrics['balanced_accuracy'])}**",
        f"- Melanoma sensitivity (label): **{_f(metrics['per_class']['mel']['sensitivity'])}**",
        f"- Accuracy: {_f(metrics['accuracy'])}; macro AUC: {_f(metrics['macro_auc'])}",
        f"- Referral: rate {_f(referral['rate'])}, sensitivity {_f(referral['sensitivity_concerning'])} for malignant "
        f"and pre-malignant lesions, {_f(referral['sensitivity_mel'])} for melanoma, specificity "
        f"{_f(referral['specificity_benign'])} for benign lesions.",
        "",
        "Calibration (expected calibration error, 15 bins, top-class confidence):",
        "",
        "| probabilities | ECE |",
        "| --- | ---: |",
        f"| uncalibrated softmax | {_f(metrics['ece_uncalibrated'])} |",
        f"| temperature scaling only (T = {_f(metrics.get('temperature_only'))}) "
        f"| {_f(metrics.get('ece_temperature_only'))} |",
        f"| temperature + class bias (shipped) | {_f(metrics['ece'])} |",
        "",
        "| class | n | sensitivity | specificity | PPV | NPV | F1 | AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {code} | {row['support']} | {_f(row['sensitivity'])} | {_f(row['specificity'])} | {_f(row['ppv'])} | "
            f"{_f(row['npv'])} | {_f(row['f1'])} | {_f(row['auc'])} |"
            for code, row in metrics["per_class"].items()
        ],
        "",
        "![confusion matrix](confusion_matrix.png) ![reliability diagram](reliability.png) ![ROC curves](roc.png)",
        "",
        "## Subgroups",
        "",
        "Test-split figures by sex, age band and body site. Small groups give unstable figures: read the n.",
        "HAM10000 records no skin type (Fitzpatrick), so performance on darker skin is **unknown**; the",
        "collection comes mostly from fair-skinned patients in Austria and Australia.",
    ]
    for name, groups in metrics["subgroups"].items():
        lines += ["", f"### By {name.replace('_', ' ')}", "", *_subgroup_table(groups)]
    lines += _notes(manifest)
    lines += [
        "",
        "## Known limits",
        "",
        "- Trained and tested on 200x150 downscales of the 600x450 HAM10000 images; clinic uploads are larger and",
        "  are resized down to the model's input, so fine detail above that resolution is not used.",
        "- Dermoscopy images only; seven classes only. Lesions outside them (e.g. squamous cell carcinoma other",
        "  than in situ, Merkel cell carcinoma, non-pigmented melanoma variants) will be forced into one of them.",
        "- No skin-type information in the data (see Subgroups). Few images of acral, mucosal, scalp and genital",
        "  sites.",
        "- Dermatofibroma and vascular lesions have under 20 test images each: their figures have wide",
        "  confidence intervals.",
        "- Diagnoses are a mix of histopathology, follow-up, expert consensus and confocal microscopy.",
        "- Calibration holds for HAM10000's class mix; a clinic whose case mix differs (e.g. a melanoma clinic)",
        "  will see probabilities that are systematically off.",
        "",
        "## Training history",
        "",
        "| epoch | train loss | val balanced acc. | val accuracy | minutes |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {r['epoch']} | {_f(r['train_loss'])} | {_f(r['val_balanced_accuracy'])} | {_f(r['val_accuracy'])} | "
            f"{_f(r['minutes'], 1)} |"
            for r in history
        ],
        "",
    ]
    path = entry / "model_card.md"
    path.write_text("\n".join(lines))
    return path
