"""Serving a registry entry: calibrated predictions and Grad-CAM heat maps for PIL images.

    predictor = Predictor.load("ml/registry/<model-id>")          # verifies the SHA-256 first
    predictions = predictor.predict([image, ...])                  # batched internally
    explanation = predictor.explain(image)                         # heat map + PNG overlay
    prediction, explanation = predictor.analyze(image)             # both from one forward pass

Inference runs under ``torch.inference_mode()`` in channels-last layout, with autocast on CUDA.
Where the head is average pooling + linear (checked at load), the heat map comes from the same
forward pass as the classification; otherwise :class:`ml.gradcam.GradCAM` runs a second pass with
gradients. Load this in the process that will use it: after a fork, never before (CUDA).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from torch import nn

from ml import heatmap, preprocess, registry
from ml import model as models
from ml.decision import DecisionPolicy
from ml.gradcam import GradCAM, class_activation_map, linear_gap_head
from ml.labels import CLASSES, NUM_CLASSES


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's answer. ``probabilities`` has all seven class codes and sums to 1."""

    label: str
    probabilities: dict[str, float]
    confidence: float
    uncertainty: float
    referral: bool
    referral_reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    """Grad-CAM for one class: ``heatmap`` is (H, W) float32 in [0, 1] at the overlay's size."""

    class_code: str
    heatmap: np.ndarray
    overlay_png: bytes
    method: str  # "cam" (one pass) or "gradcam" (gradients)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Analysis:
    """A classified image and what its heat map can be computed from without another forward pass."""

    prediction: Prediction
    batch: np.ndarray  # (1, H, W, 3) normalised input
    features: np.ndarray | None  # (K, h, w) last feature map, when the one-pass CAM applies


@dataclass
class ModelInfo:
    model_id: str
    architecture: str
    weights_sha256: str
    version: str
    manifest: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU. Call only after any fork."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    def __init__(
        self,
        model: nn.Module,
        prep: models.Preprocessing,
        policy: DecisionPolicy,
        *,
        device: str | torch.device = "cpu",
        info: ModelInfo | None = None,
        tta: str = "none",
        batch_size: int = 32,
        overlay_max_side: int = heatmap.DEFAULT_MAX_SIDE,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device).to(memory_format=torch.channels_last)
        self.prep = prep
        self.policy = policy
        self.info = info or ModelInfo("unregistered", type(model).__name__, "", "0")
        if tta not in ("none", "hflip"):
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        self.tta = tta
        self.batch_size = batch_size
        self.overlay_max_side = overlay_max_side
        head = linear_gap_head(self.model)
        self.cam_weight = head[0] if head is not None else None
        self._autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self._gradcam = GradCAM(self.model)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", **kwargs: Any) -> Predictor:
        """Load a registry entry after verifying its weights' SHA-256 against the manifest.

        Raises :class:`ml.registry.IntegrityError` for a tampered file and
        :class:`ml.registry.RegistryError` for anything else wrong with the entry.
        """
        entry = registry.resolve(path)
        manifest = registry.read_manifest(entry)
        if tuple(manifest.get("classes", ())) != CLASSES:
            raise registry.RegistryError(
                f"{entry.name}: class order {manifest.get('classes')} differs from dermq's {list(CLASSES)}"
            )
        data = registry.read_verified(entry, "weights")
        try:
            state = load_safetensors(data)
        except Exception as exc:
            raise registry.RegistryError(f"{entry.name}: weights file does not parse as safetensors") from exc
        net = models.create(manifest["architecture"], NUM_CLASSES)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise registry.RegistryError(f"{entry.name}: weights do not fit {manifest['architecture']}") from exc
        info = ModelInfo(
            model_id=manifest["model_id"],
            architecture=manifest["architecture"],
            weights_sha256=manifest["files"]["weights"]["sha256"],
            version=str(manifest.get("version", "")),
            manifest=manifest,
        )
        return cls(
            net,
            models.Preprocessing.from_dict(manifest["preprocessing"]),
            DecisionPolicy.from_dict(manifest["decision"]),
            device=device,
            info=info,
            tta=manifest.get("tta", "none"),
            **kwargs,
        )

    # ---------------------------------------------------------------- inference

    def _to_device(self, batch_nhwc: np.ndarray) -> torch.Tensor:
        # NHWC memory viewed as NCHW is exactly the channels-last layout.
        return torch.from_numpy(batch_nhwc).permute(0, 3, 1, 2).to(self.device, non_blocking=True)

    def forward(self, batch_nhwc: np.ndarray, *, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W, 3) normalised float32 -> (logits (N, C) float32, last feature map (N, K, h, w) or None).

        With test-time flips the logits are the mean over the original and mirrored image; the
        feature map is always the original image's.
        """
        x = self._to_device(batch_nhwc)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self._autocast or torch.float32, enabled=self._autocast is not None),
        ):
            if self.tta == "hflip":
                x = torch.cat([x, x.flip(3)])
            fmap = self.model.forward_features(x)
            logits = self.model.forward_head(fmap).float()
            if self.tta == "hflip":
                n = len(batch_nhwc)
                logits = (logits[:n] + logits[n:]) / 2
                fmap = fmap[:n]
            fmap_out = fmap.float().cpu().numpy() if features else None
            return logits.cpu().numpy(), fmap_out

    def logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, C) float32 logits for RGB images, in batches of ``batch_size``."""
        chunks = [
            self.forward(preprocess.batch_nhwc(images[i : i + self.batch_size], self.prep))[0]
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, NUM_CLASSES), dtype=np.float32)

    def decide(self, logits: np.ndarray) -> list[Prediction]:
        probabilities = self.policy.probabilities(logits)
        labels = self.policy.labels(probabilities)
        uncertainty = self.policy.uncertainty(probabilities)
        reasons = self.policy.referral_reasons(probabilities, labels)
        out = []
        for p, label, u, why in zip(probabilities, labels, uncertainty, reasons, strict=True):
            out.append(
                Prediction(
                    label=CLASSES[int(label)],
                    probabilities={c: float(v) for c, v in zip(CLASSES, p, strict=True)},
                    confidence=float(p[int(label)]),
                    uncertainty=float(u),
                    referral=bool(why),
                    referral_reasons=why,
                )
            )
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """One :class:`Prediction` per RGB image, in order."""
        return self.decide(self.logits(images))

    def explain(self, image: Image.Image, class_code: str | None = None) -> Explanation:
        """Grad-CAM of ``class_code`` (default: the predicted label) over ``image``."""
        return self.analyze(image, class_code=class_code)[1]

    def analyze(
        self, image: Image.Image, *, class_code: str | None = None, explain: bool = True
    ) -> tuple[Prediction, Explanation | None]:
        """Classification and (optionally) its heat map, sharing one forward pass where possible."""
        analysis = self.classify(image, keep_features=explain)
        return analysis.prediction, (self.explain_analysis(image, analysis, class_code) if explain else None)

    def classify(self, image: Image.Image, *, keep_features: bool = True) -> Analysis:
        """Classify one image, keeping what a later :meth:`explain_analysis` needs to avoid a second pass."""
        batch = preprocess.batch_nhwc([image], self.prep)
        logits, fmap = self.forward(batch, features=keep_features and self.cam_weight is not None)
        return Analysis(self.decide(logits)[0], batch, None if fmap is None else fmap[0])

    def explain_analysis(self, image: Image.Image, analysis: Analysis, class_code: str | None = None) -> Explanation:
        """The heat map for a classified image: from the kept feature map (one pass) or by gradients."""
        started = time.perf_counter()
        code = class_code or analysis.prediction.label
        index = CLASSES.index(code)
        if analysis.features is not None and self.cam_weight is not None:
            cam, method = class_activation_map(analysis.features, self.cam_weight, index), "cam"
        else:
            cam, _ = self._gradcam(self._to_device(analysis.batch).float(), index)
            method = "gradcam"
        heat, png = heatmap.render(image, cam, self.overlay_max_side)
        return Explanation(code, heat, png, method, time.perf_counter() - started)

    def heatmap_only(self, image: Image.Image, class_code: str) -> np.ndarray:
        """(h, w) Grad-CAM at feature resolution, for tests and comparisons."""
        batch = preprocess.batch_nhwc([image], self.prep)
        index = CLASSES.index(class_code)
        if self.cam_weight is not None:
            _, fmap = self.forward(batch, features=True)
            assert fmap is not None
            return class_activation_map(fmap[0], self.cam_weight, index)
        return self._gradcam(self._to_device(batch).float(), index)[0]

    def warm_up(self, rounds: int = 2) -> None:
        """Run a few dummy images so the first real case pays no one-off costs."""
        height, width = self.prep.input_size
        blank = Image.new("RGB", (width, height), (128, 100, 90))
        for _ in range(rounds):
            self.analyze(blank)

    def describe(self) -> str:
        return json.dumps(
            {
                "model_id": self.info.model_id,
                "device": str(self.device),
                "tta": self.tta,
                "cam": self.cam_weight is not None,
            }
        )
