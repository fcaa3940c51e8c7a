"""From logits to what a clinician sees: calibrated probabilities, label, uncertainty, referral.

Pure NumPy, shared by the predictor (serving), finalisation (fitting) and evaluation, so the three
can never disagree. The parameters live in the manifest's ``decision`` section.

- **Probabilities**: ``softmax(logits / T + b)``, calibrated on validation data for HAM10000's class
  mix (:mod:`ml.calibration`).
- **Label**: the class maximising ``p_c / prior_c`` (the Bayes rule for *balanced* error), so rare
  malignant classes are not drowned by the two-thirds majority of naevi. The label is therefore not
  always the class with the highest probability; ``confidence`` is the label's own probability.
- **Uncertainty**: predictive entropy of the probabilities divided by ``log(7)``, in [0, 1].
- **Referral**: refer when the label is malignant or pre-malignant, when the summed probability of
  those classes reaches ``referral_threshold``, or when uncertainty reaches
  ``uncertainty_threshold``. Both thresholds are chosen on validation data (see the model card).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml.calibration import Calibration
from ml.labels import CLASSES, CONCERNING

CONCERNING_INDEX = np.array([CLASSES.index(c) for c in CONCERNING])
#: by class index: whether the class is concerning (a lookup, where np.isin costs tens of microseconds)
_CONCERNING_MASK = np.isin(np.arange(len(CLASSES)), CONCERNING_INDEX)

REASON_LABEL = "concerning_label"
REASON_PROBABILITY = "concerning_probability"
REASON_UNCERTAINTY = "high_uncertainty"


REFERRAL_REASONS = (REASON_LABEL, REASON_PROBABILITY, REASON_UNCERTAINTY)


def reasons_by_row(flags: Sequence[np.ndarray], reasons: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Each row's reasons, in the order of ``reasons``: those whose flag (one boolean array over the
    rows per reason) the row meets. The flags are combined into one number per row, whose tuple is
    looked up: no Python test per row and reason."""
    met = np.zeros(np.shape(flags[0]), dtype=np.intp)
    for flag in flags:
        met = (met << 1) | np.asarray(flag, dtype=np.intp)
    table = _combinations(reasons)
    return [table[i] for i in np.atleast_1d(met).tolist()]


@functools.cache
def _combinations(reasons: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The reasons of every combination of flags, indexed by the flags as bits (the first the highest)."""
    n = len(reasons)
    return tuple(tuple(r for bit, r in enumerate(reasons) if i >> (n - 1 - bit) & 1) for i in range(1 << n))


@functools.cache
def _array(values: tuple[float, ...]) -> np.ndarray:
    """A policy's tuple as a float64 array, made once (read-only: it is shared)."""
    array = np.asarray(values, dtype=np.float64)
    array.flags.writeable = False
    return array


@functools.cache
def _log(values: tuple[float, ...]) -> np.ndarray:
    array = np.log(_array(values))
    array.flags.writeable = False
    return array


def _entropy(p: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """(N,) normalised predictive entropy of clipped probabilities ``p`` and their logarithm."""
    return np.clip(-(p * log_p).sum(axis=1) / np.log(p.shape[1]), 0.0, 1.0)


#: the smallest temperature a policy may have (fitting gives 0.5-3 on these models): near 0, logits / T
#: overflowed into NaN probabilities
MIN_TEMPERATURE = 1e-3


class NonFiniteOutput(ArithmeticError):
    """The model's scores for an image hold NaN or infinity: no decision can be made from them (a
    failing device or a broken model file, never the image: its pixels are bounded numbers)."""


@dataclass(frozen=True, slots=True)
class DecisionPolicy:
    calibration: Calibration = field(default_factory=Calibration)
    prior: tuple[float, ...] = tuple(1.0 / len(CLASSES) for _ in CLASSES)
    referral_threshold: float = 0.5
    uncertainty_threshold: float = 0.6
    #: per-class additive adjustments of the log decision score, tuned on validation data
    offsets: tuple[float, ...] = ()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits -> (N, C) calibrated probabilities (float64, rows sum to 1)."""
        return self.calibration.apply(logits)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """(N,) class indices by the balanced decision rule."""
        return self._labels(np.log(np.clip(probabilities, 1e-12, 1.0)))

    @staticmethod
    def uncertainty(probabilities: np.ndarray) -> np.ndarray:
        """(N,) normalised predictive entropy in [0, 1]."""
        p = np.clip(probabilities, 1e-12, 1.0)
        return _entropy(p, np.log(p))

    def labels_and_uncertainty(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`labels` and :meth:`uncertainty` of ``probabilities`` from one clipped logarithm: the
        same numbers, for serving, where each NumPy call after a forward pass runs cold."""
        p = np.clip(probabilities, 1e-12, 1.0)
        log_p = np.log(p)
        return self._labels(log_p), _entropy(p, log_p)

    def _labels(self, log_p: np.ndarray) -> np.ndarray:
        scores = log_p - _log(tuple(self.prior))
        if self.offsets:
            scores = scores + _array(tuple(self.offsets))
        return scores.argmax(axis=1)

    @staticmethod
    def concerning_probability(probabilities: np.ndarray) -> np.ndarray:
        return probabilities[:, CONCERNING_INDEX].sum(axis=1)

    def referral_reasons(
        self, probabilities: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray | None = None
    ) -> list[tuple[str, ...]]:
        """Each row's reasons to refer, in :data:`REFERRAL_REASONS` order, the three tests run over the
        whole batch (:func:`reasons_by_row`). ``uncertainty``: :meth:`uncertainty` of
        ``probabilities``, where the caller has it already."""
        if uncertainty is None:
            uncertainty = self.uncertainty(probabilities)
        flags = (
            _CONCERNING_MASK[np.asarray(labels, dtype=np.intp)],
            self.concerning_probability(probabilities) >= self.referral_threshold,
            uncertainty >= self.uncertainty_threshold,
        )
        return reasons_by_row(flags, REFERRAL_REASONS)

    def referrals(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.array([bool(r) for r in self.referral_reasons(probabilities, labels)], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.to_dict(),
            "label_rule": (
                "argmax over classes of log(calibrated probability) - log(training class prior) + offset "
                "(the balanced Bayes rule; v2 and later tune one offset, melanoma's, on validation data)"
            ),
            "prior": dict(zip(CLASSES, self.prior, strict=True)),
            "referral_rule": (
                "refer if the label is mel, bcc or akiec, or P(mel)+P(bcc)+P(akiec) >= referral_threshold, "
                "or normalised predictive entropy >= uncertainty_threshold"
            ),
            "referral_threshold": self.referral_threshold,
            "uncertainty_threshold": self.uncertainty_threshold,
            "offsets": dict(zip(CLASSES, self.offsets, strict=True)) if self.offsets else {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecisionPolicy:
        """The policy a manifest describes; ``ValueError`` for one no model could have been fitted to
        (a zero or negative temperature, a zero prior, a threshold outside [0, 1], a value that is not
        a finite number): each would turn every case into a wrong answer rather than an error."""
        prior = data["prior"]
        policy = cls(
            calibration=Calibration.from_dict(data["calibration"]),
            prior=tuple(float(prior[c]) for c in CLASSES),
            referral_threshold=float(data["referral_threshold"]),
            uncertainty_threshold=float(data["uncertainty_threshold"]),
            offsets=tuple(float(data["offsets"][c]) for c in CLASSES) if data.get("offsets") else (),
        )
        policy.check()
        return policy

    def check(self) -> None:
        """``ValueError`` unless every number of the policy is one serving can use (:meth:`from_dict`)."""
        temperature, bias = self.calibration.temperature, self.calibration.bias
        problems = [
            # (a temperature near 0 passed "above 0", and logits / T overflowed into NaN probabilities)
            (
                f"the temperature must be a finite number of at least {MIN_TEMPERATURE:g}",
                math.isfinite(temperature) and temperature >= MIN_TEMPERATURE,
            ),
            (f"the bias must be empty or {len(CLASSES)} finite numbers", len(bias) in (0, len(CLASSES))),
            (f"the offsets must be empty or {len(CLASSES)} finite numbers", len(self.offsets) in (0, len(CLASSES))),
            ("every prior must be a finite number above 0", all(math.isfinite(p) and p > 0 for p in self.prior)),
            ("the thresholds must lie in [0, 1]", all(0 <= t <= 1 for t in self._thresholds())),
            ("the bias and offsets must be finite", all(math.isfinite(v) for v in (*bias, *self.offsets))),
        ]
        wrong = [what for what, ok in problems if not ok]
        if wrong:
            raise ValueError(f"the decision policy is not usable: {'; '.join(wrong)}")

    def _thresholds(self) -> tuple[float, float]:
        return self.referral_threshold, self.uncertainty_threshold


def fit_mel_offset(
    probabilities: np.ndarray,
    truth: np.ndarray,
    prior: tuple[float, ...],
    *,
    grid: np.ndarray | None = None,
) -> tuple[float, ...]:
    """At most one adjustment of the balanced rule: an offset on melanoma's log score, chosen to
    maximise validation balanced accuracy with a small penalty on its size (it is fitted on a few
    hundred images: stay near the theory-backed rule). Safety does not rest on it: the referral flag
    carries that. Returns the per-class offsets (zero for every class but mel)."""
    from ml.metrics import balanced_accuracy

    grid = np.round(np.arange(-1.0, 1.01, 0.1), 2) if grid is None else grid
    mel = CLASSES.index("mel")
    base = np.log(np.clip(probabilities, 1e-12, 1.0)) - np.log(np.asarray(prior))
    best_value, best_score = 0.0, -np.inf
    for value in grid:
        shifted = base.copy()
        shifted[:, mel] += value
        score = balanced_accuracy(truth, shifted.argmax(axis=1)) - 0.01 * abs(float(value))
        if score > best_score + 1e-9 or (abs(score - best_score) <= 1e-9 and abs(value) < abs(best_value)):
            best_value, best_score = float(value), score
    return tuple(best_value if c == mel else 0.0 for c in range(len(CLASSES)))


def fit_referral_threshold(
    probabilities: np.ndarray, labels_true: np.ndarray, predicted: np.ndarray, target_sensitivity: float = 0.95
) -> float:
    """The highest P(concerning) threshold that, with the label rule, refers >= the target share of
    truly malignant or pre-malignant validation lesions."""
    concerning_truth = np.isin(labels_true, CONCERNING_INDEX)
    if not concerning_truth.any():
        return 0.5
    by_label = np.isin(predicted, CONCERNING_INDEX)
    score = DecisionPolicy.concerning_probability(probabilities)
    for threshold in np.round(np.arange(0.95, 0.0, -0.01), 2):
        referred = by_label | (score >= threshold)
        if referred[concerning_truth].mean() >= target_sensitivity:
            return float(threshold)
    return 0.01
