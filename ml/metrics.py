"""Classification metrics as dermatology reports them, in NumPy.

Per class (one-vs-rest from the multiclass decision): sensitivity, specificity, PPV, NPV, F1 and
ROC AUC from the class probability; overall: balanced multiclass accuracy (the mean per-class
sensitivity, ISIC 2018 Task 3's metric), accuracy, macro AUC and the confusion matrix. A class
absent from the truth has undefined sensitivity and AUC: reported as ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ml.labels import CLASSES


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """(C, C) counts; rows are the truth, columns the prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth), np.asarray(predicted)), 1)
    return matrix


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean sensitivity over the classes present in ``truth``."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    present = np.unique(truth)
    if len(present) == 0:
        return float("nan")
    return float(np.mean([(predicted[truth == c] == c).mean() for c in present]))


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = np.asarray(score)[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, for plotting.

    One point per distinct score: images that tie cross the threshold together, so a tie of
    positives and negatives is one diagonal step, the half that :func:`roc_auc` counts it as (a step
    per image drew a curve whose area was not the AUC beside it)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(score), kind="mergesort")
    ranked = np.asarray(score)[order]
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True][: len(ranked)]
    tp = np.concatenate([[0], np.cumsum(positive[order])[last_of_tie]])
    fp = np.concatenate([[0], np.cumsum(~positive[order])[last_of_tie]])
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def per_class(truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> dict[str, dict[str, Any]]:
    matrix = confusion_matrix(truth, predicted)
    total = matrix.sum()
    out: dict[str, dict[str, Any]] = {}
    for c, code in enumerate(CLASSES):
        tp = matrix[c, c]
        fn = matrix[c].sum() - tp
        fp = matrix[:, c].sum() - tp
        tn = total - tp - fn - fp
        ppv, sens = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        out[code] = {
            "support": int(tp + fn),
            "sensitivity": sens,
            "specificity": _ratio(tn, tn + fp),
            "ppv": ppv,
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auc": roc_auc(np.asarray(truth) == c, np.asarray(probabilities)[:, c]),
        }
    return out


def summary(truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """The headline figures for one set of predictions."""
    from ml.calibration import expected_calibration_error

    classes = per_class(truth, predicted, probabilities)
    aucs = [v["auc"] for v in classes.values() if v["auc"] is not None]
    return {
        "n": len(truth),
        "balanced_accuracy": balanced_accuracy(truth, predicted),
        "accuracy": float((np.asarray(truth) == np.asarray(predicted)).mean()) if len(truth) else float("nan"),
        "ece": expected_calibration_error(probabilities, truth),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": classes,
        "confusion_matrix": confusion_matrix(truth, predicted).tolist(),
    }


def served_referrals(
    truth: np.ndarray, referred: np.ndarray, gated: np.ndarray, concerning: np.ndarray
) -> dict[str, Any]:
    """What a clinic receives for each image, with the out-of-distribution gate applied as served.

    A gated image gets no diagnosis and no referral, only a request to retake it; the figures that
    score every image as a diagnosis count a gated melanoma the rule would have referred as referred.
    Here, for the concerning classes (``concerning``: their indices): the share referred with a
    diagnosis, the share gated (asked again: not a silent miss, but no referral either), and the share
    neither (a diagnosis that does not refer: the silent miss), with the gated share of every class.
    ``truth``, ``referred`` and ``gated`` are per image."""
    referred, gated = np.asarray(referred, dtype=bool), np.asarray(gated, dtype=bool)
    worrying = np.isin(truth, concerning)

    def share(mask: np.ndarray, among: np.ndarray) -> float | None:
        return float(mask[among].mean()) if among.any() else None

    return {
        "gated": share(gated, np.ones_like(gated)),
        "concerning_referred": share(referred & ~gated, worrying),
        "concerning_gated": share(gated, worrying),
        "concerning_missed": share(~referred & ~gated, worrying),
        "gated_by_class": {code: share(gated, truth == i) for i, code in enumerate(CLASSES)},
    }
