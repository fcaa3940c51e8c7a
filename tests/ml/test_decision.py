"""ml.calibration and ml.decision: calibration recovers a known temperature; the label and referral rules."""

from __future__ import annotations

import numpy as np

from ml.calibration import Calibration, expected_calibration_error, fit, softmax
from ml.decision import REASON_LABEL, REASON_PROBABILITY, REASON_UNCERTAINTY, DecisionPolicy, fit_referral_threshold
from ml.labels import CLASSES


def overconfident_logits(n: int = 6000, temperature: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probabilities are softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, len(CLASSES)))
    true = softmax(logits / temperature)
    labels = np.array([rng.choice(len(CLASSES), p=p) for p in true])
    return logits, labels


def test_temperature_is_recovered_and_ece_falls() -> None:
    logits, labels = overconfident_logits()
    fitted = fit(logits, labels, with_bias=False)
    assert abs(fitted.temperature - 2.5) < 0.2
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(fitted.apply(logits), labels)
    assert before > 0.1 and after < 0.03


def test_bias_corrects_a_prior_shift() -> None:
    logits, labels = overconfident_logits(temperature=1.0)
    shifted = logits - np.array([2.0, 0, 0, 0, 0, 0, 0])  # the model under-rates class 0
    fitted = fit(shifted, labels)
    assert fitted.bias[0] - np.mean(fitted.bias[1:]) > 1.5
    assert abs(sum(fitted.bias)) < 1e-6


def test_calibration_round_trip() -> None:
    calibration = Calibration(1.7, tuple(np.linspace(-1, 1, len(CLASSES))))
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_balanced_label_rule_favours_rare_classes() -> None:
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    policy = DecisionPolicy(prior=tuple(prior))
    probabilities = np.array([[0.0, 0.0, 0.05, 0.0, 0.30, 0.65, 0.0]])
    assert CLASSES[int(policy.labels(probabilities)[0])] == "mel"  # 0.30/0.11 > 0.65/0.67
    assert CLASSES[int(DecisionPolicy().labels(probabilities)[0])] == "nv"  # uniform prior: plain argmax


def test_referral_reasons() -> None:
    policy = DecisionPolicy(referral_threshold=0.3, uncertainty_threshold=0.5)
    certain_nv = np.array([0.0, 0.0, 0.0, 0.0, 0.01, 0.99, 0.0]) + 1e-9
    worrying_nv = np.array([0.05, 0.05, 0.0, 0.0, 0.25, 0.65, 0.0])
    confused = np.full(len(CLASSES), 1 / len(CLASSES))
    probabilities = np.stack([certain_nv, worrying_nv, confused, certain_nv])
    labels = np.array([5, 5, 2, 4])
    reasons = policy.referral_reasons(probabilities, labels)
    assert reasons[0] == ()
    assert reasons[1] == (REASON_PROBABILITY,)
    assert REASON_UNCERTAINTY in reasons[2]
    assert reasons[3] == (REASON_LABEL,)
    assert policy.referrals(probabilities, labels).tolist() == [False, True, True, True]


def test_referral_reasons_over_a_batch_are_each_rows_own() -> None:
    # every combination of the three tests, in one batch, against the rule applied row by row
    policy = DecisionPolicy(referral_threshold=0.3, uncertainty_threshold=0.5)
    rng = np.random.default_rng(5)
    probabilities = rng.dirichlet(np.full(len(CLASSES), 0.4), size=400)
    labels = rng.integers(0, len(CLASSES), size=400)  # any label with any probabilities: every combination
    concerning, uncertainty = policy.concerning_probability(probabilities), policy.uncertainty(probabilities)
    expected = [
        tuple(
            reason
            for reason, met in (
                (REASON_LABEL, CLASSES[int(label)] in ("mel", "bcc", "akiec")),
                (REASON_PROBABILITY, p >= 0.3),
                (REASON_UNCERTAINTY, u >= 0.5),
            )
            if met
        )
        for label, p, u in zip(labels, concerning, uncertainty, strict=True)
    ]
    assert policy.referral_reasons(probabilities, labels) == expected
    assert len(set(expected)) == 8  # each of the eight combinations occurs
    assert policy.referral_reasons(probabilities[:0], labels[:0]) == []


def test_policy_round_trip() -> None:
    policy = DecisionPolicy(Calibration(1.3, (0.1,) * 7), tuple([1 / 7] * 7), 0.25, 0.7)
    assert DecisionPolicy.from_dict(policy.to_dict()) == policy


def test_referral_threshold_reaches_its_target() -> None:
    logits, labels = overconfident_logits(temperature=1.0, seed=4)
    probabilities = softmax(logits)
    predicted = probabilities.argmax(1)
    threshold = fit_referral_threshold(probabilities, labels, predicted, 0.95)
    policy = DecisionPolicy(referral_threshold=threshold, uncertainty_threshold=1.1)
    concerning = np.isin(labels, [CLASSES.index(c) for c in ("akiec", "bcc", "mel")])
    assert policy.referrals(probabilities, predicted)[concerning].mean() >= 0.95


def test_labels_and_uncertainty_together_are_each_alone() -> None:
    """Serving takes both from one clipped logarithm: the same labels and the same uncertainty, to the
    bit, as the two methods that fitting and evaluation call."""
    rng = np.random.default_rng(8)
    policy = DecisionPolicy(
        calibration=Calibration(temperature=1.3, bias=tuple(rng.normal(0, 0.3, len(CLASSES)))),
        prior=tuple(np.full(len(CLASSES), 1 / len(CLASSES))),
        offsets=tuple(0.4 if c == "mel" else 0.0 for c in CLASSES),
    )
    probabilities = policy.probabilities(rng.normal(0, 3, (500, len(CLASSES))))
    probabilities[0] = np.eye(len(CLASSES))[2]  # a certain answer: its zeros are clipped
    labels, uncertainty = policy.labels_and_uncertainty(probabilities)
    assert np.array_equal(labels, policy.labels(probabilities))
    assert np.array_equal(uncertainty, policy.uncertainty(probabilities))
    assert len(set(labels.tolist())) > 3 and uncertainty[0] < 1e-9
