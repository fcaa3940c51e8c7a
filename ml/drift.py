"""Input and prediction drift: simple per-image statistics and the population stability index.

The reference comes from the model's own validation data and is stored in the registry manifest
(``drift_reference``): for each numeric feature the decile edges of the reference and the share of
reference images between them; for the predicted label, the share of each class. Live data is
binned on the same edges and compared with

    PSI = sum over bins of (live_share - reference_share) * ln(live_share / reference_share)

Common reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a significant one.
NumPy and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ml.labels import CLASSES

FEATURES = ("brightness", "contrast", "megapixels")
PSI_ALERT = 0.25
EPSILON = 1e-4


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


def _edges(values: np.ndarray, bins: int = 10) -> list[float]:
    quantiles = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return [float(q) for q in quantiles]


def _shares(values: np.ndarray, edges: Sequence[float]) -> list[float]:
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)
    return [float(c) / max(1, len(values)) for c in counts]


def build_reference(stats: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, Any]:
    """The reference distributions from validation images' statistics and predicted labels."""
    reference: dict[str, Any] = {"n": len(stats), "features": {}}
    for feature in FEATURES:
        values = np.array([s[feature] for s in stats], dtype=np.float64)
        edges = _edges(values)
        reference["features"][feature] = {"edges": edges, "shares": _shares(values, edges)}
    counts = {c: 0 for c in CLASSES}
    for label in labels:
        counts[label] += 1
    reference["labels"] = {c: counts[c] / max(1, len(labels)) for c in CLASSES}
    return reference


def psi(reference: Sequence[float], live: Sequence[float]) -> float:
    total = 0.0
    for expected, actual in zip(reference, live, strict=True):
        expected, actual = max(expected, EPSILON), max(actual, EPSILON)
        total += (actual - expected) * math.log(actual / expected)
    return total


def compare(reference: dict[str, Any], stats: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, Any]:
    """PSI of each feature and of the label distribution of live data against ``reference``."""
    out: dict[str, Any] = {"n": len(stats), "psi": {}, "drifted": []}
    if not stats:
        out["psi"] = {f: None for f in (*FEATURES, "label")}
        return out
    for feature in FEATURES:
        ref = reference["features"][feature]
        values = np.array([s[feature] for s in stats], dtype=np.float64)
        out["psi"][feature] = round(psi(ref["shares"], _shares(values, ref["edges"])), 4)
    live_labels = [sum(1 for label in labels if label == c) / len(labels) for c in CLASSES]
    out["psi"]["label"] = round(psi([reference["labels"][c] for c in CLASSES], live_labels), 4)
    out["drifted"] = [name for name, value in out["psi"].items() if value is not None and value > PSI_ALERT]
    return out


def reference_for_entry(entry: str, data: str) -> dict[str, Any]:
    """Compute the drift reference of a registry entry from its own validation split and store it in
    the manifest (``drift_reference``)."""
    from ml import registry
    from ml.evaluate import select_samples
    from ml.images import ImageLimits, decode
    from ml.predictor import Predictor

    predictor = Predictor.load(entry, device="cpu")
    samples, _ = select_samples(predictor.info.manifest, data, "val")
    stats, images = [], []
    for sample in samples:
        decoded = decode(sample.path.read_bytes(), ImageLimits(min_side=8), reduce_to=1024)
        stats.append(input_statistics(decoded.image, decoded.width, decoded.height))
        images.append(decoded.image)
    labels = [p.label for p in predictor.predict(images)]
    reference = build_reference(stats, labels)
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
