"""Input and prediction drift: simple per-image statistics, the population stability index and a test
of whether a PSI is more than sampling noise.

The reference comes from the model's own validation data and is stored in the registry manifest
(``drift_reference``): for each numeric feature the decile edges of the reference plus two guard edges
just outside the reference's range, and the share of reference images between them (the two
open-ended outer bins hold none); for the predicted label, the share of each class. An input far
outside the reference range (a 12 MP camera upload against 0.03 MP training images) therefore lands
in a bin the reference leaves empty. A format-1 reference (no ``format`` key: decile edges only, no
guard edges) gets its guard edges estimated from the decile edges when it is read.

Live data is binned on the same edges. Shares are smoothed, not clipped at an epsilon (with which
one empty bin would add 0.69): the reference's with a Jeffreys prior (half a case per bin), the live
data's by the same number of pseudo-cases spread like the reference, so an empty bin costs what its
sampling noise warrants at this sample size. Then


    PSI = sum over bins of (live_share - reference_share) * ln(live_share / reference_share)

A check drifts only when both hold: the PSI is above ``PSI_ALERT`` (the effect size; common reading:
below 0.1 stable, 0.1 to 0.25 moderate, above 0.25 significant) and it is improbable as noise at this
sample size: its p-value against PSI's null distribution for ``n`` live and ``reference n`` cases,
simulated from the reference, is below ``ALPHA`` split over the four checks. Below ``MIN_CASES`` live
cases the report says "insufficient data", publishes no PSI and never alerts. NumPy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ml.labels import CLASSES

FEATURES = ("brightness", "contrast", "megapixels")
CHECKS = (*FEATURES, "label")
#: the agreed effect size (the report's verdict, published as dermq_drift_alert, is what the alert fires on)
PSI_ALERT = 0.25
#: fewer live cases than this: "insufficient data", no PSI, no alert
MIN_CASES = 100
#: false-alarm rate of one report with no real drift, Bonferroni-split over the checks
ALPHA = 0.01
#: Jeffreys prior: cases added to every bin before taking shares
PRIOR = 0.5
#: draws of the simulated null distribution of PSI (p-values resolve to 1 / (NULL_DRAWS + 1))
NULL_DRAWS = 2000
#: reference layout: 2 = guard edges around the reference range stored in ``edges``
REFERENCE_FORMAT = 2
#: guard edges sit this fraction of the reference's range (or of its value, if constant) outside it
GUARD_MARGIN = 0.1
INSUFFICIENT = "insufficient data"


def input_statistics(image: Image.Image, width: int, height: int) -> dict[str, float]:
    """Brightness (mean grey level, 0-255), contrast (its standard deviation) and the upload's size
    in megapixels (``width`` x ``height`` as stored in the file)."""
    thumb = image.convert("L")
    thumb.thumbnail((128, 128))
    pixels = np.asarray(thumb, dtype=np.float32)
    return {
        "brightness": round(float(pixels.mean()), 3),
        "contrast": round(float(pixels.std()), 3),
        "megapixels": round(width * height / 1e6, 4),
    }


def _margin(low: float, high: float) -> float:
    return GUARD_MARGIN * (high - low) or GUARD_MARGIN * max(abs(low), abs(high)) or 1e-6


def _edges(values: np.ndarray, bins: int = 10) -> list[float]:
    """Interior decile edges plus a guard edge below the smallest and above the largest value."""
    low, high = float(values.min()), float(values.max())
    margin = _margin(low, high)
    deciles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return [float(e) for e in np.unique([low - margin, *deciles, high + margin])]


def _bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Cases per bin; bin ``i`` holds values in ``[edges[i-1], edges[i])``, the outer bins are open."""
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)


def build_reference(stats: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, Any]:
    """The reference distributions (format 2) from validation images' statistics and predicted labels."""
    if not stats:
        raise ValueError("a drift reference needs at least one validation image")
    n = len(stats)
    reference: dict[str, Any] = {"format": REFERENCE_FORMAT, "n": n, "features": {}}
    for feature in FEATURES:
        values = np.array([s[feature] for s in stats], dtype=np.float64)
        edges = _edges(values)
        shares = _bin_counts(values, edges) / n
        reference["features"][feature] = {
            "edges": edges,
            "shares": [float(s) for s in shares],
            "range": [float(values.min()), float(values.max())],
        }
    counts = {c: 0 for c in CLASSES}
    for label in labels:
        counts[label] += 1
    reference["labels"] = {c: counts[c] / max(1, len(labels)) for c in CLASSES}
    return reference


def reference_bins(reference: dict[str, Any], feature: str) -> tuple[list[float], list[float]]:
    """``feature``'s edges and reference shares, with guard edges added to a format-1 reference
    (which has none: its outer bins run to infinity and hold reference cases, so nothing far
    outside the reference could ever look new). The guards go one 10-90 % spread beyond the outer
    deciles (about 3.8 standard deviations from the mean of a normal feature), or
    ``GUARD_MARGIN`` of the value where the deciles coincide; the reference's share beyond them is
    taken to be zero."""
    entry = reference["features"][feature]
    edges, shares = [float(e) for e in entry["edges"]], [float(s) for s in entry["shares"]]
    if reference.get("format", 1) >= REFERENCE_FORMAT or not edges:
        return edges, shares
    spread = (edges[-1] - edges[0]) or GUARD_MARGIN * max(abs(edges[0]), abs(edges[-1])) or 1e-6
    return [edges[0] - spread, *edges, edges[-1] + spread], [0.0, *shares, 0.0]


def reference_shares(counts: np.ndarray) -> np.ndarray:
    """Reference bin shares under a Jeffreys prior (``PRIOR`` cases added to every bin), so that no
    bin, not even a guard bin, has a share of zero. ``counts``: (..., bins) -> same shape, float64."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + PRIOR) / (counts.sum(axis=-1, keepdims=True) + PRIOR * counts.shape[-1])


def live_shares(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Live bin shares shrunk toward the ``reference`` shares by as many pseudo-cases as a Jeffreys
    prior adds (half a case per bin), spread like the reference: an empty bin gets the share that its
    sampling noise leaves plausible at this ``n`` instead of an epsilon, and a bin the reference
    leaves empty (a guard bin) gets no pseudo-cases of its own. (..., bins) -> same shape, float64."""
    counts = np.asarray(counts, dtype=np.float64)
    weight = PRIOR * counts.shape[-1]
    return (counts + weight * reference) / (counts.sum(axis=-1, keepdims=True) + weight)


def psi(reference_counts: np.ndarray, live_counts: np.ndarray) -> np.ndarray:
    """PSI of smoothed live against smoothed reference shares (see the module docstring).
    Counts: (..., bins) float64 or int, broadcastable against each other -> (...) float64."""
    expected = reference_shares(reference_counts)
    actual = live_shares(live_counts, expected)
    return np.sum((actual - expected) * np.log(actual / expected), axis=-1)


def null_psi(reference_counts: np.ndarray, n: int, rng: np.random.Generator, draws: int = NULL_DRAWS) -> np.ndarray:
    """PSI's distribution when live data and reference come from the same population: ``draws``
    samples of ``n`` live and ``sum(reference_counts)`` reference cases from the smoothed reference
    shares, each scored like real data. (bins,) -> (draws,) float64."""
    population = reference_shares(reference_counts)
    reference_n = max(1, round(float(np.sum(reference_counts))))
    live = rng.multinomial(n, population, size=draws)
    reference = rng.multinomial(reference_n, population, size=draws)
    return psi(reference, live)


def _check(reference_counts: np.ndarray, live_counts: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    observed = float(psi(reference_counts, live_counts))
    null = null_psi(reference_counts, int(live_counts.sum()), rng)
    return observed, float((1 + np.count_nonzero(null >= observed)) / (1 + len(null)))


def compare(
    reference: dict[str, Any],
    stats: Sequence[dict[str, float]],
    labels: Sequence[str],
    *,
    min_cases: int = MIN_CASES,
    seed: int = 0,
) -> dict[str, Any]:
    """PSI and its p-value for each feature and for the label mix of live data against ``reference``
    (either format). ``drifted`` lists the checks whose PSI exceeds ``PSI_ALERT`` with a p-value
    below ``ALPHA / len(CHECKS)``; with fewer than ``min_cases`` cases nothing is computed and
    ``status`` is "insufficient data". The null distribution is simulated from ``seed``, so a report
    is reproducible."""
    n = len(stats)
    if len(labels) != n:
        raise ValueError(f"{n} input statistics but {len(labels)} labels; give one label per case")
    out: dict[str, Any] = {
        "n": n,
        "min_n": min_cases,
        "alpha": ALPHA,
        "psi": {c: None for c in CHECKS},
        "p_value": {c: None for c in CHECKS},
        "drifted": [],
    }
    if n < min_cases:
        out["status"] = INSUFFICIENT
        out["note"] = f"{n} cases; drift is assessed from {min_cases} cases on"
        return out
    rng = np.random.default_rng(seed)
    reference_n = float(reference["n"])
    for check in CHECKS:
        if check == "label":
            ref_counts = np.array([reference["labels"].get(c, 0.0) for c in CLASSES]) * reference_n
            live_counts = np.array([sum(1 for label in labels if label == c) for c in CLASSES])
        else:
            edges, shares = reference_bins(reference, check)
            ref_counts = np.asarray(shares, dtype=np.float64) * reference_n
            live_counts = _bin_counts(np.array([s[check] for s in stats], dtype=np.float64), edges)
        value, p_value = _check(ref_counts, live_counts, rng)
        out["psi"][check], out["p_value"][check] = round(value, 4), round(p_value, 5)
        if value > PSI_ALERT and p_value < ALPHA / len(CHECKS):
            out["drifted"].append(check)
    out["status"] = "drift" if out["drifted"] else "stable"
    return out


def reference_for_entry(entry: str, data: str) -> dict[str, Any]:
    """Compute the drift reference of a registry entry from its own validation split and store it in
    the manifest (``drift_reference``, format 2)."""
    from ml import registry
    from ml.evaluate import select_samples
    from ml.images import ImageLimits
    from ml.predictor import Predictor
    from ml.served_decode import decode_as_served

    predictor = Predictor.load(entry, device="cpu")
    samples, _ = select_samples(predictor.info.manifest, data, "val")
    stats, images = [], []
    for sample in samples:
        decoded = decode_as_served(sample.path.read_bytes(), ImageLimits(min_side=8))  # what live statistics see
        stats.append(input_statistics(decoded.image, decoded.width, decoded.height))
        images.append(decoded.image)
    # live reports count diagnoses only: images the model's gate would answer out_of_distribution are
    # left out of the reference too
    predictions = predictor.predict(images)
    kept = [i for i, p in enumerate(predictions) if not p.out_of_distribution]
    reference = build_reference([stats[i] for i in kept], [predictions[i].label for i in kept])
    reference["source"] = "validation split of the training data"
    folder = registry.resolve(entry)
    manifest = registry.read_manifest(folder)
    manifest["drift_reference"] = reference
    registry.write_json_atomic(folder / registry.MANIFEST, manifest)
    return reference


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m ml.drift", description="store a registry entry's drift reference (validation split)"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the HAM10000-layout folder the model was trained on")
    args = parser.parse_args(argv)
    reference = reference_for_entry(args.model, args.data)
    print(json.dumps({"n": reference["n"], "labels": reference["labels"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
