"""Not a lesion, not an answer: the out-of-distribution gate in front of every diagnosis.

A classifier trained on seven classes gives one of them to anything: an all-white image was
labelled nv at 0.976. The gate answers such inputs with ``out_of_distribution`` instead. Four
scores, each with a threshold set on validation lesions (quantiles; no out-of-distribution data is
used to fit it, so the set that measures it stays honest):

- ``contrast``: standard deviation of the luminance (0-255) of the model's input. Blank and uniform
  images have almost none; every dermoscopy image has some.
- ``noise``: mean absolute difference between the luminance and its 3x3 box blur, over the
  luminance's standard deviation. Natural images are smooth at that scale; noise is not.
- ``colour``: squared Mahalanobis distance of simple colour statistics (mean and spread of each
  channel, centre minus border) from those of the training images: skin under a dermatoscope has a
  narrow range of colours and a lesion in the middle; photographs, logos and screens do not.
- ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020): high where the network recognises nothing.
- ``distance``: squared Mahalanobis distance of the model's pooled last-layer features, projected
  on their first ``d`` principal components, to the nearest class mean with one shared covariance
  (Lee et al. 2018), fitted on the training images' features.

An input is out of distribution when any score passes its threshold; ``reasons`` says which. NumPy
only: the features come from whichever backend serves the model (the same pass as the heat map).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ml.labels import NUM_CLASSES

REASONS = ("blank", "noise", "colour", "energy", "feature_distance")
#: validation quantiles of each score's threshold (low side for contrast, high side for the rest);
#: the union flags about 1-1.5% of validation lesions
QUANTILES = {"contrast": 0.002, "noise": 0.997, "colour": 0.997, "energy": 0.998, "distance": 0.995}
COMPONENTS = 512
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def colour_statistics(batch_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) model input -> (N, 9): channel means, channel spreads, centre minus border."""
    x = np.asarray(batch_uint8, dtype=np.float32)
    n, h, w, _ = x.shape
    centre = x[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean(axis=(1, 2))
    rim_h, rim_w = max(1, h // 8), max(1, w // 8)
    border = np.concatenate(
        [
            x[:, :rim_h].reshape(n, -1, 3),
            x[:, -rim_h:].reshape(n, -1, 3),
            x[:, :, :rim_w].reshape(n, -1, 3),
            x[:, :, -rim_w:].reshape(n, -1, 3),
        ],
        axis=1,
    ).mean(axis=1)
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), centre - border], axis=1).astype(np.float64)


def image_scores(batch_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """(N, H, W, 3) uint8 (or float in 0-255) model input -> ``contrast`` and ``noise`` (N,)."""
    luma = np.asarray(batch_uint8, dtype=np.float32) @ _LUMA  # (N, H, W)
    contrast = luma.std(axis=(1, 2))
    padded = np.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = luma.shape[1:]
    blurred = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    detail = np.abs(luma - blurred).mean(axis=(1, 2))
    return {"contrast": contrast, "noise": detail / np.maximum(contrast, 1.0)}


def energy(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def pooled(feature_map: np.ndarray) -> np.ndarray:
    """(N, K, h, w) -> (N, K) global average (what the classifier head sees)."""
    return np.asarray(feature_map, dtype=np.float64).mean(axis=(2, 3))


@dataclass(frozen=True)
class OODGate:
    mean: np.ndarray  # (K,) feature mean
    projection: np.ndarray  # (K, d) principal axes
    class_means: np.ndarray  # (C, d)
    precision: np.ndarray  # (d, d) inverse of the shared, shrunk covariance
    colour_mean: np.ndarray  # (9,)
    colour_precision: np.ndarray  # (9, 9)
    thresholds: dict[str, float]

    @cached_property
    def _whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, d) map from centred features to whitened coordinates, and the (C, d) whitened class means.

        With precision P = L L^T (Cholesky), (z - m)^T P (z - m) = ||(z - m) L||^2: one matrix product
        per image instead of a quadratic form per class."""
        lower = np.linalg.cholesky(self.precision)
        return self.projection @ lower, self.class_means @ lower

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N, K) pooled features -> (N,) squared Mahalanobis distance to the nearest class mean."""
        to_white, means = self._whitening
        w = (np.asarray(features, dtype=np.float64) - self.mean) @ to_white  # (N, d)
        return (((w[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)).min(axis=1)

    def colour(self, batch_uint8: np.ndarray) -> np.ndarray:
        diff = colour_statistics(batch_uint8) - self.colour_mean
        return np.einsum("nd,de,ne->n", diff, self.colour_precision, diff)

    def scores(self, batch_uint8: np.ndarray, logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        return {
            **image_scores(batch_uint8),
            "colour": self.colour(batch_uint8),
            "energy": energy(logits),
            "distance": self.distance(features),
        }

    def reasons(self, scores: dict[str, np.ndarray]) -> list[tuple[str, ...]]:
        t = self.thresholds
        flags = {
            "blank": scores["contrast"] < t["contrast"],
            "noise": scores["noise"] > t["noise"],
            "colour": scores["colour"] > t["colour"],
            "energy": scores["energy"] > t["energy"],
            "feature_distance": scores["distance"] > t["distance"],
        }
        n = len(scores["contrast"])
        return [tuple(r for r in REASONS if flags[r][i]) for i in range(n)]

    def arrays(self) -> dict[str, np.ndarray]:
        """What the registry stores in ``ood.safetensors`` (float32)."""
        return {
            "mean": self.mean.astype(np.float32),
            "projection": self.projection.astype(np.float32),
            "class_means": self.class_means.astype(np.float32),
            "precision": self.precision.astype(np.float32),
            "colour_mean": self.colour_mean.astype(np.float32),
            "colour_precision": self.colour_precision.astype(np.float32),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": (
                "out of distribution when any score passes its threshold: luminance contrast (blank), "
                "high-frequency ratio (noise), Mahalanobis distance of colour statistics (colour), energy "
                "-logsumexp(logits), squared Mahalanobis distance of pooled features (PCA) to the nearest "
                "class mean (feature_distance); thresholds are validation quantiles"
            ),
            "components": int(self.projection.shape[1]),
            "thresholds": dict(self.thresholds),
            "quantiles": dict(QUANTILES),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], thresholds: dict[str, float]) -> OODGate:
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            projection=np.asarray(arrays["projection"], dtype=np.float64),
            class_means=np.asarray(arrays["class_means"], dtype=np.float64),
            precision=np.asarray(arrays["precision"], dtype=np.float64),
            colour_mean=np.asarray(arrays["colour_mean"], dtype=np.float64),
            colour_precision=np.asarray(arrays["colour_precision"], dtype=np.float64),
            thresholds={k: float(v) for k, v in thresholds.items()},
        )


def _shrunk_precision(centred: np.ndarray, shrinkage: float, dof: int) -> np.ndarray:
    d = centred.shape[1]
    cov = centred.T @ centred / max(1, len(centred) - dof)
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(d) * np.trace(cov) / d
    return np.linalg.inv(cov)


def fit(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_batch_uint8: np.ndarray,
    val_batch_uint8: np.ndarray,
    val_logits: np.ndarray,
    val_features: np.ndarray,
    *,
    components: int = COMPONENTS,
    shrinkage: float = 0.05,
) -> OODGate:
    """Feature statistics from the training images; thresholds from validation quantiles."""
    x = np.asarray(train_features, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    d = min(components, vt.shape[0])
    projection = vt[:d].T
    z = (x - mean) @ projection
    class_means = np.stack(
        [z[train_labels == c].mean(axis=0) if (train_labels == c).any() else z.mean(axis=0) for c in range(NUM_CLASSES)]
    )
    precision = _shrunk_precision(z - class_means[train_labels], shrinkage, NUM_CLASSES)
    colours = colour_statistics(train_batch_uint8)
    colour_mean = colours.mean(axis=0)
    colour_precision = _shrunk_precision(colours - colour_mean, shrinkage, 1)
    gate = OODGate(mean, projection, class_means, precision, colour_mean, colour_precision, thresholds={})
    scores = gate.scores(val_batch_uint8, val_logits, val_features)
    thresholds = {key: float(np.quantile(scores[key], q)) for key, q in QUANTILES.items()}
    return OODGate(mean, projection, class_means, precision, colour_mean, colour_precision, thresholds)
