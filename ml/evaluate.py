"""Evaluate a registry entry on a labelled HAM10000-layout folder.

    python -m ml.evaluate --model ml/registry/<model-id> --data DIR --out DIR [--split auto] [--backend torch]

Writes ``metrics.json`` (balanced accuracy, accuracy, ECE, per-class sensitivity, specificity, PPV,
NPV, F1 and AUC, macro AUC, confusion matrix, referral figures, and the same by sex, age band and
body site), PNG plots (confusion matrix, reliability diagram, ROC curves) and ``report.md``.

``--split auto`` evaluates the model's own held-out test split when the folder is the data the
model was trained from (recognised by the manifest's data digest). Another folder may hold the same
lesions (the larger HAM10000 samples, the full release, a folder missing a few images): with
``--training-data DIR`` (the folder the model was trained from) it evaluates only the images of
lesions in neither its training nor its validation part (``unseen``); without it, every image is
scored, with a warning, and the report says its figures may include lesions the model was trained
or tuned on (as with ``--split all``).
``--backend`` evaluates the torch model or one of the ONNX Runtime graphs that ``python -m
ml.export`` wrote (``onnx``: fp32, ``onnx-int8``: static int8).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml import data as ds
from ml import registry
from ml.calibration import expected_calibration_error, reliability_bins, softmax
from ml.decision import CONCERNING_INDEX, DecisionPolicy
from ml.labels import CLASSES
from ml.metrics import balanced_accuracy, roc_curve, served_referrals, summary
from ml.modelcard import subgroup_table

SUBGROUPS = {"sex": lambda s: s.sex, "age_band": lambda s: s.age_band, "site": lambda s: s.site}
MEL = CLASSES.index("mel")


def _referral_figures(truth: np.ndarray, referred: np.ndarray) -> dict[str, Any]:
    concerning = np.isin(truth, CONCERNING_INDEX)
    mel = truth == MEL
    return {
        "rate": float(referred.mean()) if len(truth) else None,
        "sensitivity_concerning": float(referred[concerning].mean()) if concerning.any() else None,
        "sensitivity_mel": float(referred[mel].mean()) if mel.any() else None,
        "specificity_benign": float((~referred[~concerning]).mean()) if (~concerning).any() else None,
    }


def _group_figures(
    truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, referred: np.ndarray
) -> dict[str, Any]:
    mel = truth == MEL
    return {
        "n": len(truth),
        "classes_present": len(np.unique(truth)),
        "concerning_n": int(np.isin(truth, CONCERNING_INDEX).sum()),  # what the referral sensitivity is of
        "accuracy": float((truth == predicted).mean()),
        "balanced_accuracy": balanced_accuracy(truth, predicted),
        "mel_n": int(mel.sum()),
        "mel_sensitivity": float((predicted[mel] == MEL).mean()) if mel.any() else None,
        "ece": expected_calibration_error(probabilities, truth),
        "referral_sensitivity_concerning": _referral_figures(truth, referred)["sensitivity_concerning"],
    }


def evaluate_arrays(
    samples: Sequence[ds.Sample],
    logits: np.ndarray,
    policy: DecisionPolicy,
    *,
    min_subgroup: int = 1,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics for ``logits`` (N, C) of ``samples``; returns (metrics, probabilities, predicted)."""
    truth = np.array([s.label for s in samples])
    probabilities = policy.probabilities(logits)
    predicted = policy.labels(probabilities)
    referred = policy.referrals(probabilities, predicted)
    metrics = summary(truth, predicted, probabilities)
    metrics["ece_uncalibrated"] = expected_calibration_error(softmax(logits), truth)
    metrics["nll"] = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(truth)), truth], 1e-12, 1))))
    metrics["referral"] = _referral_figures(truth, referred)
    metrics["reliability"] = reliability_bins(probabilities, truth)
    subgroups: dict[str, dict[str, Any]] = {}
    for name, key in SUBGROUPS.items():
        groups: dict[str, list[int]] = defaultdict(list)
        for i, sample in enumerate(samples):
            groups[key(sample)].append(i)
        subgroups[name] = {
            value: _group_figures(truth[idx], predicted[idx], probabilities[idx], referred[idx])
            for value, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            if len(idx) >= min_subgroup
        }
    metrics["subgroups"] = subgroups
    return metrics, probabilities, predicted


def write_plots(out: Path, metrics: dict[str, Any], truth: np.ndarray, probabilities: np.ndarray) -> list[str]:
    """confusion_matrix.png, reliability.png, roc.png in ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = []

    matrix = np.array(metrics["confusion_matrix"], dtype=float)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rows[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, label="share of true class")
    ax.set_title(f"Confusion matrix (balanced accuracy {metrics['balanced_accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    names.append("confusion_matrix.png")

    bins = [b for b in metrics["reliability"] if b["count"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(
        [(b["lower"] + b["upper"]) / 2 for b in bins],
        [b["accuracy"] for b in bins],
        width=1 / len(metrics["reliability"]),
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C3", label="per bin")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {metrics['ece']:.3f}; uncalibrated {metrics['ece_uncalibrated']:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    names.append("reliability.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, code in enumerate(CLASSES):
        if (truth == c).any() and (truth != c).any():
            fpr, tpr = roc_curve(truth == c, probabilities[:, c])
            ax.plot(fpr, tpr, label=f"{code} (AUC {metrics['per_class'][code]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, one class vs rest (macro AUC {metrics['macro_auc'] or float('nan'):.3f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    names.append("roc.png")
    return names


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report_markdown(metrics: dict[str, Any], title: str, plots: Sequence[str] = ()) -> str:
    referral = metrics["referral"]
    lines = [f"# {title}", ""]
    if metrics.get("caveat"):
        lines += [f"> {metrics['caveat']}", ""]
    lines += [
        f"- images: {metrics['n']}",
        f"- balanced multiclass accuracy: {_fmt(metrics['balanced_accuracy'])}",
        f"- accuracy: {_fmt(metrics['accuracy'])}",
        f"- macro AUC: {_fmt(metrics['macro_auc'])}",
        f"- expected calibration error: {_fmt(metrics['ece'])} "
        f"(uncalibrated softmax: {_fmt(metrics['ece_uncalibrated'])})",
        f"- referral rate {_fmt(referral['rate'])}; referral sensitivity for malignant or pre-malignant "
        f"lesions {_fmt(referral['sensitivity_concerning'])}, for melanoma {_fmt(referral['sensitivity_mel'])} "
        "(every image scored as a diagnosis)",
        *_served_lines(metrics.get("served")),
        "",
        "| class | n | sensitivity | specificity | PPV | NPV | F1 | AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for code, row in metrics["per_class"].items():
        lines.append(
            f"| {code} | {row['support']} | {_fmt(row['sensitivity'])} | {_fmt(row['specificity'])} | "
            f"{_fmt(row['ppv'])} | {_fmt(row['npv'])} | {_fmt(row['f1'])} | {_fmt(row['auc'])} |"
        )
    for name, groups in metrics["subgroups"].items():
        lines += ["", f"## By {name.replace('_', ' ')}", "", *subgroup_table(groups)]  # the model card's
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _served_lines(served: dict[str, Any] | None) -> list[str]:
    if not served:
        return []
    return [
        f"- as served, with the out-of-distribution gate: {_fmt(served['gated'])} of images get no diagnosis "
        f"(retake); of malignant or pre-malignant lesions {_fmt(served['concerning_referred'])} referred, "
        f"{_fmt(served['concerning_gated'])} gated, {_fmt(served['concerning_missed'])} neither; melanomas "
        f"gated {_fmt(served['gated_by_class']['mel'])}"
    ]


def select_samples(
    manifest: dict[str, Any], data: str | Path, split: str, training_data: str | Path | None = None
) -> tuple[list[ds.Sample], str]:
    """The samples of ``data`` in ``split`` and the name of the part used: ``train``, ``val`` or
    ``test`` of the split the manifest records; ``unseen``, the images of lesions in neither the
    training nor the validation part of ``training_data``'s split; ``all``; or ``auto``: ``test`` when
    ``data`` is the data the model was trained on, ``unseen`` when ``training_data`` is given, else
    ``all`` (with a warning when its lesions may be training's)."""
    samples = ds.read_dataset(data)
    info = manifest.get("data", {})
    used = ds.used_samples(manifest, samples)  # a --limit run's digest and split are of its subset
    if split == "auto":
        if info.get("digest") and ds.dataset_digest(used) == info["digest"]:
            split = "test"
        elif training_data is not None:
            split = "unseen"
        else:  # every image, as the report's caveat and this warning say (an evaluator's own data: its lesions
            # appear nowhere else, and the command must go on serving it)
            if info.get("digest"):
                print(
                    f"warning: {data} is not the data this model was trained on and may hold the same lesions (the "
                    "larger HAM10000 samples and the full release do), which would inflate its figures: every "
                    "image is scored; --training-data with the training folder leaves its lesions out",
                    file=sys.stderr,
                )
            split = "all"
    if split == "all":
        return samples, "all"
    if split == "unseen":
        return _unseen(manifest, samples, data, training_data), "unseen"
    try:  # a part of another folder's split holds lesions the model was trained on
        ds.check_training_data(info, used, data)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    parts = ds.SplitSpec.from_record(info).apply(used)
    return getattr(parts, split), split


def _unseen(
    manifest: dict[str, Any], samples: list[ds.Sample], data: str | Path, training_data: str | Path | None
) -> list[ds.Sample]:
    """``samples`` less the images of every lesion in the training or validation part of the model's
    split of ``training_data`` (checked to be its training data by the manifest's digest)."""
    if training_data is None:
        raise SystemExit("--split unseen needs --training-data: the folder the model was trained on")
    info = manifest.get("data", {})
    training = ds.used_samples(manifest, ds.read_dataset(training_data))
    try:
        ds.check_training_data(info, training, training_data)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    parts = ds.SplitSpec.from_record(info).apply(training)
    seen = {s.lesion_id for s in (*parts.train, *parts.val)}
    unseen = [s for s in samples if s.lesion_id not in seen]
    if not unseen:
        raise SystemExit(f"every image of {data} is of a lesion the model was trained or tuned on")
    return unseen


def load_images(samples: Sequence[ds.Sample]) -> list[Any]:
    """The samples' images decoded as serving decodes them (:func:`ml.served_decode.decode_as_served`),
    with a progress bar on a terminal's stderr."""
    from ml.images import ImageLimits
    from ml.served_decode import decode_as_served

    limits = ImageLimits(min_side=8)
    return [
        decode_as_served(s.path.read_bytes(), limits).image
        for s in tqdm(samples, desc="decode", unit="img", leave=False, disable=None, mininterval=1)
    ]


def model_outputs(predictor: Any, images: Sequence[Any], chunk: int = 256) -> Any:
    """``predictor.outputs(images)``, a chunk at a time behind a progress bar (terminals only)."""
    from ml.predictor import ModelOutputs

    starts = range(0, len(images), chunk)
    parts = [
        predictor.outputs(images[i : i + chunk])
        for i in tqdm(starts, desc="classify", unit="chunk", leave=False, disable=None, mininterval=1)
    ]
    if not parts:
        return predictor.outputs([])
    return ModelOutputs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ModelOutputs._fields))


def run(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "auto",
    training_data: str | Path | None = None,
    backend: str = "torch",
    batch_size: int = 32,
) -> dict[str, Any]:
    from ml.backends import float32_on_cuda
    from ml.predictor import Predictor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = "auto" if backend == "torch" else "cpu"  # ONNX Runtime serves on the CPU
    float32_on_cuda()  # on a GPU the figures are of float32, as served, not of cuDNN's TF32
    predictor = Predictor.load(model, device=device, backend=backend, batch_size=batch_size)
    manifest = predictor.info.manifest
    samples, used = select_samples(manifest, data, split, training_data)
    images = load_images(samples)
    logits, features, pixels = model_outputs(predictor, images)
    metrics, probabilities, predicted = evaluate_arrays(samples, logits, predictor.policy)
    metrics.update({"model_id": predictor.info.model_id, "split": used, "backend": backend})
    if used == "all":
        metrics["caveat"] = (
            "every image of the folder was scored: any of its lesions the model was trained or tuned on "
            "inflates these figures"
        )
    truth = np.array([s.label for s in samples])
    if predictor.gate is not None:
        # every image is scored as a diagnosis above; this is what a clinic gets with the gate applied
        flagged = predictor.gate.reasons(predictor.gate.scores(pixels, logits, features))
        metrics["out_of_distribution"] = float(np.mean([bool(r) for r in flagged])) if flagged else 0.0
        referred = predictor.policy.referrals(probabilities, predicted)
        metrics["served"] = served_referrals(truth, referred, np.array([bool(r) for r in flagged]), CONCERNING_INDEX)
    plots = write_plots(out, metrics, truth, probabilities)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(
        report_markdown(metrics, f"{predictor.info.model_id} on {Path(data).name} ({used})", plots)
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry entry folder or model id")
    p.add_argument("--data", required=True, help="labelled HAM10000-layout folder")
    p.add_argument("--out", required=True, help="folder for metrics.json, plots and report.md")
    # the optional ones have no default here: run()'s signature holds them
    p.add_argument("--split", choices=["auto", "all", "unseen", "train", "val", "test"], default=argparse.SUPPRESS)
    p.add_argument(
        "--training-data",
        default=argparse.SUPPRESS,
        help="the folder the model was trained on: another folder's lesions in its training or validation "
        "part are left out",
    )
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS)
    options = vars(p.parse_args(argv))
    try:
        metrics = run(options.pop("model"), options.pop("data"), options.pop("out"), **options)
    except (registry.RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in ("model_id", "backend", "split", "n", "balanced_accuracy", "accuracy", "ece", "macro_auc")
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
