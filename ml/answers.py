"""What a :class:`~ml.predictor.Predictor` answers: an image's prediction, its analysis and heat map,
the raw model outputs, and which model answered (also importable from :mod:`ml.predictor`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ml import heatmap


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's answer. ``probabilities`` has all seven class codes and sums to 1."""

    label: str
    probabilities: dict[str, float]
    confidence: float
    uncertainty: float
    referral: bool
    referral_reasons: tuple[str, ...] = ()
    #: the input is not a dermoscopy image the model can judge (see :mod:`ml.ood`): the other fields
    #: are the model's raw answer and must not be shown as a diagnosis
    out_of_distribution: bool = False
    ood_reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    """Grad-CAM for one class: ``cam`` is the (h, w) float32 map in [0, 1] at the feature map's
    resolution, ``overlay_png`` the overlay drawn from it at ``size`` (width, height)."""

    class_code: str
    cam: np.ndarray
    overlay_png: bytes
    method: str  # "cam" (one pass) or "gradcam" (gradients)
    size: tuple[int, int]
    seconds: float = 0.0

    @property
    def heatmap(self) -> np.ndarray:
        """The (H, W) float32 map in [0, 1] at the overlay's size, made when asked for (serving draws
        the overlay without it)."""
        return heatmap.upsample(self.cam, self.size)


@dataclass(frozen=True, slots=True)
class Analysis:
    """A classified image and what its heat map can be computed from without another forward pass."""

    prediction: Prediction
    batch: np.ndarray  # (1, H, W, 3) normalised input
    features: np.ndarray | None  # (K, h, w) last feature map, when the one-pass CAM applies


class ModelOutputs(NamedTuple):
    """Raw model outputs for N images (see :meth:`Predictor.outputs`)."""

    logits: np.ndarray  # (N, C) float32
    features: np.ndarray  # (N, K) float32, the last feature map average-pooled
    pixels: np.ndarray  # (N, H, W, 3) uint8, the model input before normalisation


@dataclass
class ModelInfo:
    """Which model a predictor serves, and from which verified file."""

    model_id: str
    architecture: str
    weights_sha256: str
    version: str
    manifest: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"  # torch | onnx | onnx-int8
    artefact_sha256: str = ""  # digest of the file that computes the answers (weights or ONNX graph)
    #: digest of the manifest bytes ``manifest`` was parsed from: what a pin is checked against
    #: (:func:`ml.registry.check_pinned`), never a second read of a file that may have changed since
    manifest_sha256: str = ""
