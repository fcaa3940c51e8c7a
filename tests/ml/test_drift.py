"""Drift statistics: quiet on sampling noise at any sample size, unmoved by one empty bin, loud on real
shifts (brighter or darker images, camera-sized uploads), and still readable from the shipped
manifest's reference."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from ml import drift, registry
from ml.labels import CLASSES

SHIPPED = "effnet-lite0-ham10000-v1"
LABEL_MIX = ["nv"] * 14 + ["mel", "mel", "bkl", "bkl", "bcc", "akiec"]


def population(rng: np.random.Generator, n: int) -> tuple[list[dict[str, float]], list[str]]:
    """``n`` cases from one fixed population: the reference and every no-drift live sample."""
    stats = [
        {
            "brightness": float(rng.normal(150, 20)),
            "contrast": float(rng.normal(40, 8)),
            "megapixels": float(rng.choice([0.03, 0.03, 0.0675])),
        }
        for _ in range(n)
    ]
    return stats, [str(label) for label in rng.choice(LABEL_MIX, size=n)]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return drift.build_reference(*population(np.random.default_rng(0), 1277))


def false_alarm_rate(reference: dict[str, Any], n: int, draws: int, **options: Any) -> float:
    rng = np.random.default_rng(n)
    alarms = sum(
        bool(drift.compare(reference, *population(rng, n), seed=i, **options)["drifted"]) for i in range(draws)
    )
    return alarms / draws


@pytest.mark.parametrize("n", [10, 36, 100])
def test_no_drift_rarely_alerts_at_small_samples(reference: dict[str, Any], n: int) -> None:
    assert false_alarm_rate(reference, n, draws=150) < 0.05


@pytest.mark.parametrize("n", [10, 36])
def test_significance_alone_keeps_noise_quiet_below_the_minimum(reference: dict[str, Any], n: int) -> None:
    """With the minimum sample size switched off, PSI above 0.25 is common noise at these sizes (it
    was what fired the alert); the p-value against PSI's null distribution still rejects it."""
    rng = np.random.default_rng(100 + n)
    loud = sum(
        max(drift.compare(reference, *population(rng, n), min_cases=0)["psi"].values()) > 0.25 for _ in range(40)
    )
    assert loud > 10  # the effect size alone would alert
    assert false_alarm_rate(reference, n, draws=100, min_cases=0) < 0.05


def test_too_few_cases_say_insufficient_data_and_never_alert(reference: dict[str, Any]) -> None:
    stats, labels = population(np.random.default_rng(3), drift.MIN_CASES - 1)
    report = drift.compare(reference, [{**s, "megapixels": 12.0} for s in stats], labels)
    assert report["status"] == drift.INSUFFICIENT and report["drifted"] == []
    assert set(report["psi"].values()) == {None}  # nothing reaches the dermq_drift_psi gauge


def _decile_midpoints(reference: dict[str, Any], feature: str) -> list[float]:
    edges, _ = drift.reference_bins(reference, feature)
    return [(low + high) / 2 for low, high in itertools.pairwise(edges)]


def test_one_empty_bin_does_not_inflate_psi(reference: dict[str, Any]) -> None:
    """27 cases, three in each of nine brightness deciles and none in the tenth: an empty decile
    happens by chance in almost half of such samples. A 1e-4 epsilon made that bin alone add 0.69."""
    midpoints = _decile_midpoints(reference, "brightness")
    assert len(midpoints) == 10
    full = [m for m in midpoints for _ in range(3)]
    one_empty = [m for m in midpoints[:4] + midpoints[5:] for _ in range(3)]
    _, labels = population(np.random.default_rng(4), 30)

    def brightness(values: list[float]) -> dict[str, Any]:
        stats = [{"brightness": v, "contrast": 40.0, "megapixels": 0.03} for v in values]
        report = drift.compare(reference, stats, labels[: len(values)], min_cases=0)
        return {"psi": report["psi"]["brightness"], "p": report["p_value"]["brightness"], "drifted": report["drifted"]}

    calm, empty = brightness(full), brightness(one_empty)
    assert calm["psi"] < 0.02
    assert empty["psi"] - calm["psi"] < 0.2 and empty["psi"] < drift.PSI_ALERT
    assert empty["p"] > 0.05 and "brightness" not in empty["drifted"]


def test_psi_is_finite_when_live_and_reference_bins_are_empty() -> None:
    reference = np.array([0.0, 500.0, 500.0, 0.0])
    value = drift.psi(reference, np.array([0, 0, 40, 0]))
    assert np.isfinite(value) and value > drift.PSI_ALERT  # half the reference is missing: a real shift


@pytest.mark.parametrize(
    ("feature", "change"),
    [
        ("brightness", lambda s: {**s, "brightness": s["brightness"] - 20}),  # one standard deviation darker
        ("brightness", lambda s: {**s, "brightness": s["brightness"] + 20}),
        ("contrast", lambda s: {**s, "contrast": s["contrast"] * 1.5}),
        ("megapixels", lambda s: {**s, "megapixels": 12.0}),  # phone-camera uploads
        ("megapixels", lambda s: {**s, "megapixels": 1.0}),
    ],
)
def test_a_real_shift_alerts_at_the_minimum_sample(reference: dict[str, Any], feature: str, change: Any) -> None:
    stats, labels = population(np.random.default_rng(5), drift.MIN_CASES)
    report = drift.compare(reference, [change(s) for s in stats], labels)
    assert report["status"] == "drift" and feature in report["drifted"]
    assert report["psi"][feature] > drift.PSI_ALERT and report["p_value"][feature] < drift.ALPHA / len(drift.CHECKS)


def test_a_shift_in_predicted_labels_alerts(reference: dict[str, Any]) -> None:
    stats, labels = population(np.random.default_rng(6), 150)
    report = drift.compare(reference, stats, ["mel"] * 60 + labels[60:])
    assert report["drifted"] == ["label"]


def test_built_reference_has_open_guard_bins_around_its_range(reference: dict[str, Any]) -> None:
    assert reference["format"] == drift.REFERENCE_FORMAT
    for feature in drift.FEATURES:
        entry = reference["features"][feature]
        low, high = entry["range"]
        assert entry["edges"][0] < low and entry["edges"][-1] > high
        assert entry["shares"][0] == entry["shares"][-1] == 0.0 and sum(entry["shares"]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the shipped manifest


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The shipped entry's reference: written before guard bins (no ``format``), and its megapixels
    reference is one value (every training image is 200x150 = 0.03 MP)."""
    reference: dict[str, Any] = registry.read_manifest(SHIPPED)["drift_reference"]
    assert "format" not in reference and reference["features"]["megapixels"]["edges"] == [0.03]
    return reference


def like_shipped(
    reference: dict[str, Any], n: int, rng: np.random.Generator
) -> tuple[list[dict[str, float]], list[str]]:
    """``n`` cases drawn from the shipped reference's own bins (uniform within each decile)."""
    columns: dict[str, np.ndarray] = {}
    for feature in ("brightness", "contrast"):
        edges, shares = drift.reference_bins(reference, feature)
        bins = rng.choice(len(shares), size=n, p=np.asarray(shares) / sum(shares))
        columns[feature] = rng.uniform(np.asarray(edges)[bins - 1], np.asarray(edges)[bins])
    shares = [reference["labels"][c] for c in CLASSES]
    labels = [str(c) for c in rng.choice(CLASSES, size=n, p=np.asarray(shares) / sum(shares))]
    stats = [
        {"brightness": float(b), "contrast": float(c), "megapixels": 0.03}
        for b, c in zip(columns["brightness"], columns["contrast"], strict=True)
    ]
    return stats, labels


def test_shipped_reference_stays_quiet_on_training_like_uploads(shipped: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    reports = [drift.compare(shipped, *like_shipped(shipped, 150, rng), seed=i) for i in range(20)]
    assert sum(bool(r["drifted"]) for r in reports) <= 1


@pytest.mark.parametrize("megapixels", [1.0, 12.0])
def test_shipped_reference_reports_camera_sized_uploads(shipped: dict[str, Any], megapixels: float) -> None:
    stats, labels = like_shipped(shipped, drift.MIN_CASES, np.random.default_rng(8))
    report = drift.compare(shipped, [{**s, "megapixels": megapixels} for s in stats], labels)
    assert report["drifted"] == ["megapixels"] and report["psi"]["megapixels"] > 5
