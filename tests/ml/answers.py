"""Whether a cheaper decode of an image gets the full decode's answer."""

from __future__ import annotations

import numpy as np
import pytest

from ml.labels import CLASSES
from ml.predictor import Prediction, Predictor


def _within_reach(predictor: Predictor, probabilities: dict[str, float], other: str, amount: float) -> bool:
    """Whether moving ``amount`` of probability from the chosen label to ``other`` makes the
    decision rule choose ``other``."""
    p = np.array([probabilities[c] for c in CLASSES])
    chosen, target = int(predictor.policy.labels(p[None])[0]), CLASSES.index(other)
    p[chosen], p[target] = max(p[chosen] - amount, 1e-12), p[target] + amount
    return int(predictor.policy.labels(p[None])[0]) == target


def assert_same_answer(predictor: Predictor, full: Prediction, fast: Prediction, tolerance: float) -> bool:
    """Every calibrated probability of ``fast`` within ``tolerance`` of ``full``'s, and the same label
    unless ``full``'s lies so near the decision boundary that the probabilities' measured shift
    crosses it. Returns whether ``full``'s answer was clear of the boundary (callers require most to be)."""
    for code, probability in full.probabilities.items():
        assert fast.probabilities[code] == pytest.approx(probability, abs=tolerance)
    shift = max(abs(fast.probabilities[c] - full.probabilities[c]) for c in CLASSES)
    borderline = any(_within_reach(predictor, full.probabilities, c, shift) for c in CLASSES if c != full.label)
    assert fast.label == full.label or borderline, (full.label, fast.label, full.probabilities)
    return not borderline
