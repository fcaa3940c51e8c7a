"""Not a lesion, not an answer: the out-of-distribution gate in front of every diagnosis.

A classifier trained on seven classes gives one of them to anything, an all-white image included.
The gate answers such inputs with ``out_of_distribution`` instead. Five
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

A gate fitted with ``stride`` s > 1 reads the model input's pixels for ``contrast``, ``noise`` and
``colour`` at every s-th row and column (``pixel_stride`` in the manifest): a quarter of the pixels at
s = 2, and about 0.2 ms less on the worker's path for a 168x224 input (0.51 against 0.31 ms on one
image here). Each score is then a different number, so a stride is fitted with its thresholds and
never changed after: entries fitted without one read every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml.decision import reasons_by_row
from ml.labels import NUM_CLASSES

REASONS = ("blank", "noise", "colour", "energy", "feature_distance")
#: validation quantiles of each score's threshold (low side for contrast, high side for the rest);
#: the union flags about 1-1.5% of validation lesions
QUANTILES = {"contrast": 0.002, "noise": 0.997, "colour": 0.997, "energy": 0.998, "distance": 0.995}
COMPONENTS = 512
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def colour_statistics(batch_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) model input -> (N, 9): channel means, channel spreads, centre minus border (the
    border being the outer eighth on each side, corners counted in both strips).

    Every sum is of integers and exact, so the result is the same to the bit as summing the pixels
    one by one, however it is computed. For uint8 pixels the sums are int64, over one planar copy
    (each channel's pixels side by side in memory, whatever the input's layout): a half of the time of
    the per-channel histograms used before for one 168x224 image (0.13 against 0.24 ms here), a fifth
    at a gate's stride of 4, on the worker's critical path."""
    x = np.asarray(batch_uint8)
    if x.dtype != np.uint8:
        return _colour_statistics_float64(np.asarray(x, dtype=np.float64))
    if len(x) > _CHUNK:  # the int64 copy of a whole training split would take gigabytes
        return np.concatenate([colour_statistics(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
    n, h, w, _ = x.shape
    planes = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.int64)  # (N, 3, H, W)
    flat = planes.reshape(n, 3, h * w)
    mean = flat.sum(axis=2) / (h * w)
    squares = np.einsum("ncp,ncp->nc", flat, flat)  # exact: at most 255**2 * h * w
    spread = np.sqrt(np.maximum(squares / (h * w) - mean**2, 0.0))
    inner = planes[:, :, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    centre = inner.sum(axis=(2, 3)) / (inner.shape[2] * inner.shape[3])
    rim_h, rim_w = max(1, h // 8), max(1, w // 8)
    strips = (planes[:, :, :rim_h], planes[:, :, -rim_h:], planes[:, :, :, :rim_w], planes[:, :, :, -rim_w:])
    border = sum(strip.sum(axis=(2, 3)) for strip in strips) / sum(strip.shape[2] * strip.shape[3] for strip in strips)
    return np.concatenate([mean, spread, centre - border], axis=1)


#: images at a time in :func:`colour_statistics`: 64 of 168x224 are a 58 MB int64 copy
_CHUNK = 64


def _colour_statistics_float64(x: np.ndarray) -> np.ndarray:
    """:func:`colour_statistics` for any pixels: float64 matrix products (BLAS), five times faster
    than strided reductions for one image, and for integer pixels exact."""
    h, w = x.shape[1:3]
    mean = _sums(x) / (h * w)
    spread = np.sqrt(np.maximum(_sums(x * x) / (h * w) - mean**2, 0.0))
    return np.concatenate([mean, spread, _centre_minus_border(x)], axis=1)


def _centre_minus_border(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[1:3]
    inner = x[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    centre = _sums(inner) / (inner.shape[1] * inner.shape[2])
    rim_h, rim_w = max(1, h // 8), max(1, w // 8)
    strips = (x[:, :rim_h], x[:, -rim_h:], x[:, :, :rim_w], x[:, :, -rim_w:])
    border = sum(_sums(strip) for strip in strips) / sum(strip.shape[1] * strip.shape[2] for strip in strips)
    return np.asarray(centre - border)


def _sums(region: np.ndarray) -> np.ndarray:
    """(N, h, w, 3) -> (N, 3) per-channel sums."""
    flat = region.reshape(len(region), -1, 3)
    return np.matmul(np.ones(flat.shape[1]), flat)


def sampled(batch_uint8: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th row and column of (N, H, W, 3) model input: what a gate fitted with that
    stride reads for its image checks and colour statistics (a view; the input itself at 1)."""
    return batch_uint8 if stride == 1 else batch_uint8[:, ::stride, ::stride]


_BOX = [(dy, dx) for dy in range(3) for dx in range(3)]


def image_scores(batch_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """(N, H, W, 3) uint8 (or float in 0-255) model input -> ``contrast`` and ``noise`` (N,)."""
    # C order whatever the input's layout (a strided or planar view): the same products, to the bit
    luma = np.ascontiguousarray(batch_uint8, dtype=np.float32) @ _LUMA  # (N, H, W)
    contrast = _image_std(luma)
    padded = _edge_padded(luma)
    h, w = luma.shape[1:]
    # the 3x3 box sum added up in place, in the same order as summing the nine shifted copies
    detail = padded[:, :h, :w].copy()
    for dy, dx in _BOX[1:]:
        detail += padded[:, dy : dy + h, dx : dx + w]
    detail /= 9.0
    np.subtract(luma, detail, out=detail)
    detail = _image_mean(np.abs(detail, out=detail))
    return {"contrast": contrast, "noise": detail / np.maximum(contrast, 1.0)}


# NumPy's mean and std over an image's axes, as the ufunc calls they make (NumPy 2: numpy/_core/
# _methods.py, _mean and _var), without their Python wrappers, which cost more than the arithmetic
# inline after a pass (about 0.1 ms of a case for the two, 25 us saved). The same bits for the float32
# (or float64) images image_scores passes (a test holds them to NumPy's own; float16 or integer input
# would differ, NumPy widening those first): sums in the input's type, then a division by the count
# as an intp, which NumPy 2 computes in float64 and casts back (NumPy 1.26 divides in float32: the
# same call either way).
_IMAGE_AXES = (1, 2)


def _image_mean(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """``x.mean(axis=(1, 2), keepdims=keepdims)`` of (N, H, W) float32."""
    total = np.add.reduce(x, axis=_IMAGE_AXES, keepdims=True)
    mean = np.true_divide(total, np.intp(x.shape[1] * x.shape[2]), out=total, casting="unsafe")
    return mean if keepdims else mean[:, 0, 0]


def _image_std(x: np.ndarray) -> np.ndarray:
    """``x.std(axis=(1, 2))`` of (N, H, W) float32: the mean of the squared deviations, its root."""
    deviation = np.subtract(x, _image_mean(x, keepdims=True))
    variance = _image_mean(np.square(deviation, out=deviation))
    return np.sqrt(variance, out=variance)


def _edge_padded(luma: np.ndarray) -> np.ndarray:
    """``np.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")``, the same array, in a fifth of its time
    (np.pad's generality costs about 20 us a call, on the worker's path)."""
    n, h, w = luma.shape
    padded = np.empty((n, h + 2, w + 2), dtype=luma.dtype)
    padded[:, 1:-1, 1:-1] = luma
    padded[:, 0, 1:-1] = luma[:, 0]
    padded[:, -1, 1:-1] = luma[:, -1]
    padded[:, :, 0] = padded[:, :, 1]
    padded[:, :, -1] = padded[:, :, -2]
    return padded


def energy(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def pooled(feature_map: np.ndarray) -> np.ndarray:
    """(N, K, h, w) -> (N, K) global average (what the classifier head sees), summed in float64.

    The same numbers, to the bit, as widening the map to float64 and averaging it, without the
    widened copy (430 KB for one 1280x6x7 map)."""
    fmap = np.asarray(feature_map)
    return fmap.reshape(fmap.shape[0], fmap.shape[1], -1).mean(axis=2, dtype=np.float64)


@dataclass(frozen=True)
class OODGate:
    """The fitted gate. Distances are kept as whitening maps: with the shrunk precision P = L L^T
    (Cholesky), (z - m)^T P (z - m) = ||(z - m) L||^2, so one matrix product per image gives every
    class's distance. The whitening map is stored in float16 (half the file: 1280 x 512 entries),
    the rest in float32; the thresholds are fitted with the gate exactly as stored, so serving flags
    what fitting measured. Entries stored before kept it in float32 and still load."""

    mean: np.ndarray  # (K,) feature mean
    whiten: np.ndarray  # (K, d): principal axes times L, centred features -> whitened coordinates
    class_means: np.ndarray  # (C, d) whitened class means
    colour_mean: np.ndarray  # (9,)
    colour_whiten: np.ndarray  # (9, 9)
    thresholds: dict[str, float]
    #: the image checks and colour statistics read every ``stride``-th row and column
    stride: int = 1
    _mean32: np.ndarray = field(init=False, repr=False, compare=False)
    _whiten32: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mean32", np.asarray(self.mean, dtype=np.float32))
        object.__setattr__(self, "_whiten32", np.ascontiguousarray(self.whiten, dtype=np.float32))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N, K) pooled features -> (N,) squared Mahalanobis distance to the nearest class mean.

        The projection is a BLAS product (NumPy's OpenBLAS). A worker child runs it on one BLAS
        thread (``worker.runtime.pin_threads``): with a thread per core, BLAS's threads competed with
        ONNX Runtime's spinning ones and the product took 4 ms instead of 0.1 (a process that pins
        nothing runs it on all of them). Run cold after a forward pass, when the whitening map (2.6
        MB) is no longer in the core's caches, BLAS's kernel took 0.24 against np.einsum's 0.36 ms on
        the Intel host with AMX. It sums in another order than np.einsum, and blocks a batch's rows
        together: on 1,572 images a distance moved by at most 3.4e-7 of itself, and its last bits can
        depend on the images that share its batch."""
        centred = np.asarray(features, dtype=np.float32) - self._mean32
        w = np.matmul(centred, self._whiten32).astype(np.float64)
        return (((w[:, None, :] - self.class_means[None, :, :]) ** 2).sum(axis=2)).min(axis=1)

    def colour(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) model input -> (N,) squared Mahalanobis distance of its colour statistics
        (read at the gate's stride)."""
        diff = colour_statistics(self.sampled(batch_uint8)) - self.colour_mean
        # np.einsum, not BLAS: a 9 x 9 product gains nothing from it, and this keeps the scores the
        # thresholds were fitted on to the bit
        return (np.einsum("nk,kd->nd", diff, self.colour_whiten, optimize=False) ** 2).sum(axis=1)

    def sampled(self, batch_uint8: np.ndarray) -> np.ndarray:
        """The pixels the image checks and colour statistics read: every ``stride``-th row and column."""
        return sampled(batch_uint8, self.stride)

    def scores(self, batch_uint8: np.ndarray, logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        return {
            **image_scores(self.sampled(batch_uint8)),
            "colour": self.colour(batch_uint8),
            "energy": energy(logits),
            "distance": self.distance(features),
        }

    def reasons(self, scores: dict[str, np.ndarray]) -> list[tuple[str, ...]]:
        t = self.thresholds
        flags = (
            scores["contrast"] < t["contrast"],  # in REASONS order: blank, noise, colour, energy, feature_distance
            scores["noise"] > t["noise"],
            scores["colour"] > t["colour"],
            scores["energy"] > t["energy"],
            scores["distance"] > t["distance"],
        )
        return reasons_by_row(flags, REASONS)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the registry stores in ``ood.safetensors`` (the whitening map float16, the rest float32)."""
        return {
            "mean": self.mean.astype(np.float32),
            "whiten": self.whiten.astype(np.float16),
            "class_means": self.class_means.astype(np.float32),
            "colour_mean": self.colour_mean.astype(np.float32),
            "colour_whiten": self.colour_whiten.astype(np.float32),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": (
                "out of distribution when any score passes its threshold: luminance contrast (blank), "
                "high-frequency ratio (noise), Mahalanobis distance of colour statistics (colour), energy "
                "-logsumexp(logits), squared Mahalanobis distance of pooled features (PCA) to the nearest "
                "class mean (feature_distance); thresholds are validation quantiles"
            ),
            "components": int(self.whiten.shape[1]),
            "pixel_stride": self.stride,
            "thresholds": dict(self.thresholds),
            "quantiles": dict(QUANTILES),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], thresholds: dict[str, float], stride: int = 1) -> OODGate:
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"a pixel stride is a whole number at least 1, not {stride!r}")
        arrays64 = {k: np.asarray(arrays[k], dtype=np.float64) for k in _ARRAYS}
        k, d = arrays64["whiten"].shape if arrays64["whiten"].ndim == 2 else (-1, -1)
        shapes = {"mean": (k,), "class_means": (NUM_CLASSES, d), "colour_mean": (9,), "colour_whiten": (9, 9)}
        wrong = [name for name, shape in shapes.items() if arrays64[name].shape != shape]
        if k < 1 or wrong:
            raise ValueError(f"the gate's arrays do not fit together: {', '.join(wrong) or 'whiten'}")
        return cls(**arrays64, thresholds=dict(thresholds), stride=stride)


_ARRAYS = ("mean", "whiten", "class_means", "colour_mean", "colour_whiten")
#: the scores :meth:`OODGate.reasons` compares, each with its threshold
THRESHOLDS = ("contrast", "noise", "colour", "energy", "distance")


def checked_thresholds(thresholds: dict[str, Any]) -> dict[str, float]:
    """A stored gate's thresholds; ``ValueError`` unless each score has one, a finite number (a
    missing one failed the first case; NaN never flagged anything)."""
    if any(name not in thresholds for name in THRESHOLDS) or not all(
        np.isfinite(float(thresholds[name])) for name in THRESHOLDS
    ):
        raise ValueError(f"the gate needs a finite threshold for each of {', '.join(THRESHOLDS)}")
    return {name: float(thresholds[name]) for name in THRESHOLDS}


def _whitening(centred: np.ndarray, shrinkage: float, dof: int) -> np.ndarray:
    """L with L L^T the inverse of the shrunk covariance of ``centred`` rows."""
    d = centred.shape[1]
    cov = centred.T @ centred / max(1, len(centred) - dof)
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(d) * np.trace(cov) / d
    return np.linalg.cholesky(np.linalg.inv(cov))


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
    stride: int = 1,
) -> OODGate:
    """Feature statistics from the training images; thresholds from validation quantiles, computed
    with the gate exactly as stored (:meth:`OODGate.arrays`), so serving flags what fitting measured.
    ``stride``: the image checks and colour statistics read every ``stride``-th row and column."""
    x = np.asarray(train_features, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    # never more components than the training images can estimate a covariance for
    d = max(1, min(components, vt.shape[0], len(x) // 4))
    z = (x - mean) @ vt[:d].T
    class_means = np.stack(
        [z[train_labels == c].mean(axis=0) if (train_labels == c).any() else z.mean(axis=0) for c in range(NUM_CLASSES)]
    )
    lower = _whitening(z - class_means[train_labels], shrinkage, NUM_CLASSES)
    colours = colour_statistics(sampled(np.asarray(train_batch_uint8), stride))
    colour_mean = colours.mean(axis=0)
    draft = OODGate(
        mean=mean,
        whiten=vt[:d].T @ lower,
        class_means=class_means @ lower,
        colour_mean=colour_mean,
        colour_whiten=_whitening(colours - colour_mean, shrinkage, 1),
        thresholds={},
    )
    stored = OODGate.from_arrays(draft.arrays(), {}, stride)
    scores = stored.scores(val_batch_uint8, val_logits, val_features)
    thresholds = {key: float(np.quantile(scores[key], q)) for key, q in QUANTILES.items()}
    return OODGate.from_arrays(draft.arrays(), thresholds, stride)
