"""ml.assess: lesion-level bootstrap intervals, per-lesion figures, and the calibration of what is shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml import assess
from ml import data as ds
from ml.calibration import Calibration
from ml.decision import DecisionPolicy
from ml.labels import CLASSES


def _samples(lesions: int, images_per_lesion: int, rng: np.random.Generator) -> list[ds.Sample]:
    out = []
    for lesion in range(lesions):
        dx = CLASSES[lesion % len(CLASSES)]
        for shot in range(images_per_lesion):
            out.append(ds.Sample(f"ISIC_{lesion:05d}{shot}", f"HAM_{lesion:05d}", dx, Path("x.jpg")))
    return out


def _probabilities(samples: list[ds.Sample], rng: np.random.Generator, skill: float) -> np.ndarray:
    logits = rng.normal(0, 1, (len(samples), len(CLASSES)))
    logits[np.arange(len(samples)), [s.label for s in samples]] += skill
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_intervals_contain_the_figure_and_shrink_with_more_lesions() -> None:
    rng = np.random.default_rng(0)
    policy = DecisionPolicy(calibration=Calibration())
    small = _samples(70, 1, rng)
    large = _samples(700, 1, rng)
    few = assess.assess(small, _probabilities(small, rng, 2.0), policy, rounds=200)
    many = assess.assess(large, _probabilities(large, rng, 2.0), policy, rounds=200)
    for result in (few, many):
        row = result["per_image"]["balanced_accuracy"]
        assert row["ci95"][0] <= row["value"] <= row["ci95"][1]
    width = lambda r: r["per_image"]["accuracy"]["ci95"][1] - r["per_image"]["accuracy"]["ci95"][0]  # noqa: E731
    assert width(many) < width(few) * 0.6


def test_a_calibration_errors_interval_holds_its_estimate() -> None:
    """A binned calibration error only grows with a resample's duplicated lesions: the percentile
    interval of its draws sat above the estimate (v4's class-wise ECE 0.0177 in 0.0177-0.0272, per
    lesion 0.0143 in 0.0159-0.0229); the basic interval is reflected about it."""
    rng = np.random.default_rng(3)
    policy = DecisionPolicy(calibration=Calibration())
    samples = _samples(300, 2, rng)
    result = assess.assess(samples, _probabilities(samples, rng, 2.5), policy, rounds=300)
    for level in ("per_image", "per_lesion"):
        for key, row in result[level].items():
            if "ece" in key:
                assert row["ci95"][0] <= row["value"] <= row["ci95"][1], (level, key, row)
    draws = [0.03, 0.04, 0.05, 0.06]  # all above an estimate of 0.02
    low, high = assess.interval("ece_top", 0.02, draws)
    assert low < 0.02 < high and high - low == pytest.approx(0.06 - 0.03, abs=0.002)  # the draws' spread
    assert assess.interval("accuracy", 0.02, draws)[0] > 0.02  # a proportion keeps its percentile interval
    assert assess.interval("ece_top", 0.005, draws)[0] == 0.0  # floored: an error is never negative


def test_resampling_is_by_lesion_so_copies_of_an_image_do_not_narrow_the_interval() -> None:
    rng = np.random.default_rng(1)
    policy = DecisionPolicy(calibration=Calibration())
    single = _samples(140, 1, rng)
    p = _probabilities(single, rng, 1.5)
    # the same lesions, each photographed four times with identical answers
    copies = [ds.Sample(f"{s.image_id}{k}", s.lesion_id, s.dx, s.path) for s in single for k in range(4)]
    p4 = np.repeat(p, 4, axis=0)
    one = assess.assess(single, p, policy, rounds=300)["per_image"]["accuracy"]["ci95"]
    four = assess.assess(copies, p4, policy, rounds=300)["per_image"]["accuracy"]["ci95"]
    assert abs((four[1] - four[0]) - (one[1] - one[0])) < 0.05


def test_per_lesion_figures_average_a_lesions_images() -> None:
    rng = np.random.default_rng(2)
    samples = _samples(14, 3, rng)
    probabilities = _probabilities(samples, rng, 3.0)
    lesion_p, truth = assess.per_lesion(samples, probabilities)
    assert lesion_p.shape == (14, len(CLASSES)) and len(truth) == 14
    np.testing.assert_allclose(lesion_p[0], probabilities[:3].mean(axis=0))


def test_shown_label_ece_measures_the_displayed_labels_confidence() -> None:
    # P(nv) 0.6 is the top class, but the label shown is mel at 0.4: its confidence is what is judged
    probabilities = np.tile([0.0, 0.0, 0.0, 0.0, 0.4, 0.6, 0.0], (100, 1))
    truth = np.full(100, CLASSES.index("nv"))
    truth[:40] = CLASSES.index("mel")
    shown = np.full(100, CLASSES.index("mel"))
    assert assess.shown_label_ece(probabilities, shown, truth) < 1e-9  # 40% right at confidence 0.4
    top = assess.binned_gap(probabilities.max(axis=1), (probabilities.argmax(axis=1) == truth).astype(float))
    assert top < 1e-9  # and nv at 0.6 is right 60% of the time
    # the same probabilities shown as mel when mel is right only 10% of the time: miscalibrated
    rarely = np.full(100, CLASSES.index("nv"))
    rarely[:10] = CLASSES.index("mel")
    assert assess.shown_label_ece(probabilities, shown, rarely) > 0.25
    assert assess.classwise_ece(probabilities, truth) < 0.01


def test_a_class_absent_from_the_split_has_no_figure_and_its_readers_say_so(tiny_entry: Path) -> None:
    """A test split without melanomas has no melanoma sensitivity and no interval for it: ``null`` in
    metrics.json (``NaN`` is not JSON), ``n/a`` on the model card, and no field-alert floor (a ``NaN``
    floor read from a file would compare false with every observed interval: an alert that never fires)."""
    import json

    from ml import registry
    from ml.modelcard import _assessment_lines

    rng = np.random.default_rng(4)
    samples = [s for s in _samples(140, 1, rng) if s.dx != "mel"]
    result = assess.assess(
        samples, _probabilities(samples, rng, 2.0), DecisionPolicy(calibration=Calibration()), rounds=50
    )
    for level in ("per_image", "per_lesion"):
        assert result[level]["mel_sensitivity"] == {"value": None, "ci95": None}
        assert result[level]["nv_sensitivity"]["ci95"] is not None
    written = json.dumps({"assessment": result}, indent=2, allow_nan=False)  # strict JSON
    assert "| Melanoma sensitivity (label) | n/a | n/a |" in _assessment_lines(json.loads(written)["assessment"])

    model_id = registry.read_manifest(tiny_entry)["model_id"]
    (tiny_entry / registry.METRICS).write_text(written)
    assert registry.mel_sensitivity_floor(model_id, configured=tiny_entry) is None
    # an entry written before: NaN where the figure is undefined reads as no floor, not a NaN one
    (tiny_entry / registry.METRICS).write_text(written.replace('"ci95": null', '"ci95": [NaN, NaN]'))
    assert registry.mel_sensitivity_floor(model_id, configured=tiny_entry) is None
