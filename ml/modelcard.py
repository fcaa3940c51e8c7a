"""The model card of a registry entry (Mitchell et al. 2019), written from its manifest and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ml.labels import DIAGNOSES


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


#: a subgroup's calibration error over 15 bins is shown from this many images: below, it measures the
#: binning of a handful of answers more than their calibration (the card's n = 6 groups read 0.3)
ECE_MIN_N = 50


def _subgroup_table(groups: dict[str, dict[str, Any]]) -> list[str]:
    """One row a group. Balanced accuracy averages the recall of the classes a group holds: ``classes``
    says how many of the seven (a group without melanomas is not comparable with one with 52)."""
    lines = [
        "| group | n | classes | balanced acc. | accuracy | mel n | mel sensitivity | referral sens. | ECE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for value, row in groups.items():
        ece = _f(row["ece"]) if row["n"] >= ECE_MIN_N else f"n/a (n < {ECE_MIN_N})"
        lines.append(
            f"| {value} | {row['n']} | {row.get('classes_present', 'n/a')} | {_f(row['balanced_accuracy'])} | "
            f"{_f(row['accuracy'])} | {row['mel_n']} | {_f(row['mel_sensitivity'])} | "
            f"{_f(row['referral_sensitivity_concerning'])} | {ece} |"
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


def _teacher_text(teacher: dict[str, Any]) -> str:
    if teacher.get("kind") == "unavailable":
        return f"a teacher whose work folder (`{teacher['source']}`) was no longer there when this entry was written"
    size = f"{teacher['input_size'][0]}x{teacher['input_size'][1]}"
    if teacher.get("kind") == "registry entry":
        return (
            f"the registry entry `{teacher['model_id']}` (`{teacher['arch']}` at {size}, weights SHA-256 "
            f"`{teacher['weights_sha256'][:16]}...`, test balanced accuracy {_f(teacher['test_balanced_accuracy'])}; "
            "its raw logits, not its calibration)"
        )
    return (
        f"a `{teacher['arch']}` teacher ({teacher['initialisation']}) trained for {teacher['epochs']} epochs at "
        f"{size} with the same recipe (validation balanced accuracy {_f(teacher['val_balanced_accuracy_last_epoch'])} "
        f"after its last epoch, {_f(teacher['minutes'], 1)} minutes)"
    )


def _pixels_read(stride: int) -> str:
    """What a gate with ``stride`` reads of the model input."""
    nth = {2: "second", 3: "third"}.get(stride, f"{stride}th")
    return "every pixel" if stride == 1 else f"every {nth} row and column"


def _training_lines(training: dict[str, Any], prep: dict[str, Any]) -> list[str]:
    config = training["config"]
    teacher = training.get("teacher")
    env = training.get("environment") or {}
    lines = [
        f"Initialised from {training['initialisation']}. {training['epochs_run']} epochs on a fixed schedule "
        f"({_f(training['minutes'], 1)} minutes on {env.get('machine', 'a')} {env.get('device', 'cpu')}, "
        f"{env.get('precision', '')}), seed {training.get('seed')}; the shipped weights are the exponential moving "
        "average after the last epoch (no early stopping). Recipe: images through the serving decode and resize "
        f"({prep['input_size'][0]}x{prep['input_size'][1]}, 4:3, colour constancy "
        f"{prep.get('colour_constancy', 'none')}),"
        " square-root class-balanced sampling, any-angle rotation, crops of 55-100% of the area, flips, colour and "
        "hue jitter, blur and random erasing, a last epoch on whole images; AdamW "
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
        described = "; ".join(_teacher_text(t) for t in teachers)
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
        *_training_lines(training, prep),
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
        lines += ["", f"### By {name.replace('_', ' ')}", "", *_subgroup_table(groups)]
    lines += _notes(manifest)
    lines += [
        "",
        "## Known limits",
        "",
        "- Trained and tested on 200x150 downscales of the 600x450 HAM10000 images; clinic uploads are larger and",
        "  are resized down to the model's input, so fine detail above that resolution is not used. Every input is",
        "  resized to 4:3 without cropping: portrait and square uploads are squashed, which the training data never",
        "  shows.",
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
