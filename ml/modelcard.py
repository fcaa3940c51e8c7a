"""The model card of a registry entry (Mitchell et al. 2019), written from its manifest and metrics."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ml.card_training import aspect, training_lines
from ml.card_training import figure as _f
from ml.labels import DIAGNOSES

#: a class with fewer test images than this is named among the known limits (wide intervals)
FEW_TEST_IMAGES = 20
#: each class as the known limits name it
FEW_PHRASES = {
    "akiec": "actinic keratoses",
    "bcc": "basal cell carcinomas",
    "bkl": "benign keratoses",
    "df": "dermatofibroma",
    "mel": "melanomas",
    "nv": "naevi",
    "vasc": "vascular lesions",
}

#: a subgroup's calibration error over 15 bins is shown from this many images: below, it measures the
#: binning of a handful of answers more than their calibration (the card's n = 6 groups read 0.3)
ECE_MIN_N = 50


def subgroup_table(groups: dict[str, dict[str, Any]]) -> list[str]:
    """One row a group. Balanced accuracy averages the recall of the classes a group holds: ``classes``
    says how many of the seven (a group without melanomas is not comparable with one with 52). The
    referral sensitivity gives the malignant and pre-malignant images it is of, as melanoma's has
    ``mel n`` beside it, where the metrics record them (entries finalised before did not)."""
    lines = [
        "| group | n | classes | balanced acc. | accuracy | mel n | mel sensitivity | referral sens. | ECE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for value, row in groups.items():
        ece = _f(row["ece"]) if row["n"] >= ECE_MIN_N else f"n/a (n < {ECE_MIN_N})"
        referral = _f(row["referral_sensitivity_concerning"])
        if row.get("concerning_n"):
            referral += f" (n = {row['concerning_n']})"
        lines.append(
            f"| {value} | {row['n']} | {row.get('classes_present', 'n/a')} | {_f(row['balanced_accuracy'])} | "
            f"{_f(row['accuracy'])} | {row['mel_n']} | {_f(row['mel_sensitivity'])} | "
            f"{referral} | {ece} |"
        )
    return lines


def _offset_lines(decision: dict[str, Any]) -> list[str]:
    offsets = decision.get("offsets")
    if not offsets or not any(offsets.values()):
        return []
    listed = ", ".join(f"{code} {value:+.1f}" for code, value in offsets.items() if value)
    return [
        f"- **Offset** added to that log ratio before the argmax: {listed}. Tuned on the validation split to "
        "maximise balanced accuracy with a small penalty on its size.",
    ]


def _ci(row: dict[str, Any]) -> str:
    if row.get("ci95") is None:  # a class the split has no image of: no figure, no interval
        return _f(row["value"])
    lo, hi = row["ci95"]
    return f"{_f(row['value'])} ({_f(lo)}-{_f(hi)})"


def _assessment_lines(assessment: dict[str, Any] | None) -> list[str]:
    if not assessment:
        return []
    names = {
        "balanced_accuracy": "Balanced accuracy (ISIC 2018 Task 3 metric)",
        "accuracy": "Accuracy",
        "mel_sensitivity": "Melanoma sensitivity (label)",
        "nv_sensitivity": "Naevus sensitivity (label)",
        "referral_sensitivity": "Referral sensitivity, mel/bcc/akiec",
        "referral_rate": "Referral rate",
        "ece_shown": "ECE of the shown label's confidence",
        "ece_top": "ECE, top class",
        "ece_classwise": "Class-wise ECE",
    }
    image, lesion = assessment["per_image"], assessment["per_lesion"]
    return [
        f"| figure | per image (n = {assessment['images']}) | per lesion (n = {assessment['lesions']}) |",
        "| --- | ---: | ---: |",
        *[f"| {label} | {_ci(image[key])} | {_ci(lesion[key])} |" for key, label in names.items() if key in image],
        "",
        "Per lesion: the mean of a lesion's calibrated probabilities over its images, then the decision rule.",
        "",
    ]


def _cv_lines(manifest: dict[str, Any]) -> list[str]:
    table = manifest.get("cross_validation")
    if not table:
        return []
    return ["### Recipes compared by cross-validation", "", *table["lines"], "", table.get("choice", ""), ""]


def _ood_lines(manifest: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    gate = manifest.get("ood")
    if not gate:
        return []
    measured = metrics.get("ood") or {}
    built = measured.get("built_set") or {}
    kinds = ", ".join(f"{k} {_f(v['flagged'], 2)} of {v['n']}" for k, v in (built.get("per_kind") or {}).items())
    return [
        "- **Not a lesion, not an answer**: before any diagnosis, an out-of-distribution gate checks the input "
        "(luminance contrast for blank images, a high-frequency ratio for noise, colour statistics against the "
        "training images', the energy score, and the Mahalanobis distance of the model's pooled features to the "
        "nearest class). Each threshold is a validation quantile; together they flag "
        f"{_f(gate.get('validation_flagged'))} of validation images. Flagged inputs get the outcome "
        "`out_of_distribution` and no diagnosis. On the test split the gate flags "
        f"{_f(measured.get('test_lesions_flagged'))} of lesion images; on a built set of {built.get('n')} non-lesion "
        f"inputs (ml.oodset: blank, noise, textures, photographs, destroyed lesions) it flags "
        f"{_f(built.get('flagged'))} ({kinds}).",
        *_served_lines(metrics.get("served")),
    ]


def _served_lines(served: dict[str, Any] | None) -> list[str]:
    """The referral figures as a clinic receives them, gate applied (the headline ones score every
    test image as a diagnosis, a gated one included)."""
    if not served:
        return []
    return [
        "- **As served, gate applied**: the referral figures above score every test image as a diagnosis. "
        f"A gated image gets none and no referral, only a request to retake it: of malignant or pre-malignant "
        f"test lesions {_f(served['concerning_referred'])} are referred with a diagnosis, "
        f"{_f(served['concerning_gated'])} gated and {_f(served['concerning_missed'])} neither (a diagnosis "
        f"that does not refer); {_f(served['gated_by_class'].get('mel'))} of melanomas are gated.",
    ]


def _hires_lines(hires: dict[str, Any] | None) -> list[str]:
    if not hires:
        return []
    return [
        "## Larger inputs",
        "",
        f"{hires['n']} images at 300x225 (the same lesions as 200x150 development images, resized from the "
        "600x450 originals) through the serving decode path: the label changes for "
        f"{_f(hires['label_changed'])} of them; accuracy {_f(hires['accuracy_large'])} at 300x225 against "
        f"{_f(hires['accuracy_small'])} at 200x150. {hires['note'].capitalize()}. Clinic uploads of 1-12 "
        "megapixels are reduced the same way (draft decode, then one resize); expect a similar share of labels "
        "to depend on the input's resolution, and treat borderline answers accordingly.",
        "",
    ]


def _shape_lines(input_size: list[int]) -> list[str]:
    """The end of the known limit on resizing: every input is squashed to the model's shape."""
    shape = aspect(input_size)
    if shape == "4:3":  # HAM10000's own shape: only other uploads are squashed
        squashed = "portrait and square uploads are squashed, which the training data never"
        return [f"  resized to 4:3 without cropping: {squashed}", "  shows."]
    return [
        f"  resized to {shape} ({input_size[1]}x{input_size[0]}) without cropping: every upload of another shape is",
        "  squashed, HAM10000's 4:3 images among them.",
    ]


def _few_test_images(test: dict[str, Any]) -> list[str]:
    """The known limit on the classes with fewer than :data:`FEW_TEST_IMAGES` test images, from the test
    split's counts."""
    few = [code for code in FEW_PHRASES if code in test and test[code] < FEW_TEST_IMAGES]
    if not few:
        return []
    named = [FEW_PHRASES[code] for code in few]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    listed = listed[0].upper() + listed[1:]
    verb = (
        f"has under {FEW_TEST_IMAGES} test images: its"
        if len(few) == 1
        else (f"have under {FEW_TEST_IMAGES} test images each: their")
    )
    return textwrap.wrap(
        f"- {listed} {verb} figures have wide confidence intervals.", width=100, subsequent_indent="  "
    )


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
        *training_lines(training, prep),
        "",
        *_cv_lines(manifest),
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
        f"- **Test-time augmentation**: {manifest['tta']}.",
        "- **Uncertainty**: predictive entropy of the calibrated probabilities divided by log 7 (0 = certain, "
        "1 = uniform).",
        "- **Referral** (`referral = true`) when any of: the label is mel, bcc or akiec; "
        f"P(mel) + P(bcc) + P(akiec) >= {_f(decision['referral_threshold'], 2)} (the highest threshold that, with "
        "the other two rules, referred at least 96% of malignant and pre-malignant validation images: a margin "
        f"over the 95% target); uncertainty >= {_f(decision['uncertainty_threshold'])} (the most uncertain 5% of "
        "validation images). Safety rests on this flag, not on the label.",
        *_ood_lines(manifest, metrics),
        "",
        "## Results on the held-out test split",
        "",
        f"{metrics['n']} images of lesions never seen in training or validation, read once for this entry after "
        "every choice in it was made (earlier entries of the line were measured on the same split, and which "
        "entry serves was chosen after their figures were read: across the line the split is not untouched), "
        "evaluated with the shipped float16 weights in float32. Intervals are 95% lesion-level bootstrap "
        "intervals (lesions resampled with all their images, 1,000 rounds; for a calibration error, the "
        "bootstrap's spread centred on the estimate).",
        "",
        *_assessment_lines(metrics.get("assessment")),
        f"- Macro AUC: {_f(metrics['macro_auc'])}; referral specificity for benign lesions "
        f"{_f(referral['specificity_benign'])}.",
        "",
        "Calibration (expected calibration error, 15 bins; the shipped row is also in the table above):",
        "",
        "| probabilities | ECE (top class) |",
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
        *_hires_lines(metrics.get("hires")),
        "## Subgroups",
        "",
        "Test-split figures by sex, age band and body site. Small groups give unstable figures: read the n.",
        "Balanced accuracy averages over the classes a group holds (`classes`): compare groups holding the same.",
        "HAM10000 records no skin type (Fitzpatrick), so performance on darker skin is **unknown**; the",
        "collection comes mostly from fair-skinned patients in Austria and Australia.",
    ]
    for name, groups in metrics["subgroups"].items():
        lines += ["", f"### By {name.replace('_', ' ')}", "", *subgroup_table(groups)]
    lines += _notes(manifest)
    lines += [
        "",
        "## Known limits",
        "",
        "- Trained and tested on 200x150 downscales of the 600x450 HAM10000 images; clinic uploads are larger and",
        "  are resized down to the model's input, so fine detail above that resolution is not used. Every input is",
        *_shape_lines(prep["input_size"]),
        "- Dermoscopy images only; seven classes only. Lesions outside them (e.g. squamous cell carcinoma other",
        "  than in situ, Merkel cell carcinoma, non-pigmented melanoma variants) will be forced into one of them.",
        "- No skin-type information in the data (see Subgroups). Few images of acral, mucosal, scalp and genital",
        "  sites.",
        *_few_test_images(summary.get("test") or {}),
        "- Diagnoses are a mix of histopathology, follow-up, expert consensus and confocal microscopy.",
        "- Calibration holds for HAM10000's class mix; a clinic whose case mix differs (e.g. a melanoma clinic)",
        "  will see probabilities that are systematically off.",
        "",
        "## Training history",
        "",
        "Validation figures per epoch are watched, never used to choose an epoch (the schedule is fixed).",
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
