"""Serving a registry entry: calibrated predictions and Grad-CAM heat maps for PIL images.

    predictor = Predictor.load("ml/registry/<model-id>")          # verifies the SHA-256 first
    predictions = predictor.predict([image, ...])                  # batched internally
    explanation = predictor.explain(image)                         # heat map + PNG overlay
    prediction, explanation = predictor.analyze(image)             # both from one forward pass

The engine is a backend (:mod:`ml.backends`): ``torch`` (channels-last, ``inference_mode``, float32
on every device: the precision the thresholds were fitted in) or ONNX Runtime on the CPU (``onnx``,
``onnx-int8``); ``backend="auto"`` picks ONNX Runtime on the CPU when the entry has the exported
files and torch otherwise. Preprocessing, decisions and heat maps are the same code for all of them.
Where the head is average pooling + linear (checked at load, and at export for ONNX), the heat map
comes from the same forward pass as the classification; otherwise the torch backend's
:class:`ml.gradcam.GradCAM` runs a second pass with gradients. Load this in the process that will
use it: after a fork, never before (CUDA).
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

from ml import backends, heatmap, ood, preprocess, registry
from ml import model as models
from ml.backends import Backend, TorchBackend
from ml.decision import DecisionPolicy
from ml.gradcam import class_activation_map
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
    #: the input is not a dermoscopy image the model can judge (see :mod:`ml.ood`): the other fields
    #: are the model's raw answer and must not be shown as a diagnosis
    out_of_distribution: bool = False
    ood_reasons: tuple[str, ...] = ()


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
    backend: str = "torch"  # torch | onnx | onnx-int8
    artefact_sha256: str = ""  # digest of the file that computes the answers (weights or ONNX graph)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU. Call only after any fork."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Answers for images from one model. ``model`` is a torch module (served by
    :class:`ml.backends.TorchBackend` on ``device``) or a ready backend such as an ONNX Runtime one."""

    def __init__(
        self,
        model: nn.Module | Backend,
        prep: models.Preprocessing,
        policy: DecisionPolicy,
        *,
        device: str | torch.device = "cpu",
        info: ModelInfo | None = None,
        tta: str = "none",
        batch_size: int = 32,
        overlay_max_side: int = heatmap.DEFAULT_MAX_SIDE,
        gate: ood.OODGate | None = None,
    ) -> None:
        if isinstance(model, nn.Module):
            model = TorchBackend(model, resolve_device(device) if isinstance(device, str) else device)
        self.backend: Backend = model
        self.device = model.device
        #: the torch module for the torch backend, ``None`` for ONNX Runtime
        self.model: nn.Module | None = model.model if isinstance(model, TorchBackend) else None
        self.prep = prep
        self.policy = policy
        self.info = info or ModelInfo(
            "unregistered", type(self.model).__name__ if self.model is not None else model.name, "", "0"
        )
        self.info.backend = model.name
        if tta not in ("none", "hflip"):
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        self.tta = tta
        self.batch_size = batch_size
        self.overlay_max_side = overlay_max_side
        self.cam_weight = model.cam_weight
        self.gate = gate

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        backend: str = "auto",
        *,
        threads: int = backends.DEFAULT_THREADS,
        **kwargs: Any,
    ) -> Predictor:
        """Load a registry entry after verifying the SHA-256 of every file it reads against the manifest.

        ``backend`` is ``auto``, ``torch``, ``onnx`` or ``onnx-int8`` (see :func:`ml.backends.choose`);
        ONNX Runtime runs on the CPU with ``threads`` intra-op threads. Raises
        :class:`ml.registry.IntegrityError` for a tampered file and :class:`ml.registry.RegistryError`
        for anything else wrong with the entry (an ONNX backend it was not exported for, included).
        """
        entry = registry.resolve(path)
        manifest = registry.read_manifest(entry)
        if tuple(manifest.get("classes", ())) != CLASSES:
            raise registry.RegistryError(
                f"{entry.name}: class order {manifest.get('classes')} differs from dermq's {list(CLASSES)}"
            )
        if backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)}")
        # ONNX Runtime serves on the CPU: "auto" means the CPU there (and CUDA is never touched for it)
        target = torch.device("cpu") if backend in backends.ONNX_FILES and device == "auto" else resolve_device(device)
        chosen = backends.choose(manifest, backend, target)
        engine: nn.Module | Backend
        if chosen == "torch":
            engine = cls._load_torch(entry, manifest)
            served = manifest["files"]["weights"]["sha256"]
        else:
            if target.type != "cpu":
                raise ValueError(f"the {chosen} backend runs on the CPU, not {target}; use backend='torch' there")
            engine = backends.load_onnx(entry, manifest, chosen, threads=threads)
            served = manifest["files"][backends.ONNX_FILES[chosen][0]]["sha256"]
        info = ModelInfo(
            model_id=manifest["model_id"],
            architecture=manifest["architecture"],
            weights_sha256=manifest["files"]["weights"]["sha256"],
            version=str(manifest.get("version", "")),
            manifest=manifest,
            backend=chosen,
            artefact_sha256=served,
        )
        return cls(
            engine,
            models.Preprocessing.from_dict(manifest["preprocessing"]),
            DecisionPolicy.from_dict(manifest["decision"]),
            device=target,
            info=info,
            tta=manifest.get("tta", "none"),
            gate=cls._load_gate(entry, manifest),
            **kwargs,
        )

    @staticmethod
    def _load_gate(entry: Path, manifest: dict[str, Any]) -> ood.OODGate | None:
        """The entry's out-of-distribution gate (entries before v2 have none)."""
        section = manifest.get("ood")
        if not section:
            return None
        from safetensors.numpy import load as load_numpy

        try:
            arrays = load_numpy(registry.read_verified(entry, "ood"))
            return ood.OODGate.from_arrays(arrays, section["thresholds"])
        except (KeyError, ValueError) as exc:
            raise registry.RegistryError(f"{entry.name}: the out-of-distribution gate does not load") from exc

    @staticmethod
    def _load_torch(entry: Path, manifest: dict[str, Any]) -> nn.Module:
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
        return net

    # ---------------------------------------------------------------- inference

    def forward(self, batch_nhwc: np.ndarray, *, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W, 3) normalised float32 -> (logits (N, C) float32, last feature map (N, K, h, w) or None).

        With test-time flips the logits are the mean over the original and mirrored image; the
        feature map is always the original image's.
        """
        return self.backend.forward(batch_nhwc, features=features, hflip=self.tta == "hflip")

    def logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, C) float32 logits for RGB images, in batches of ``batch_size``."""
        chunks = [
            self.forward(preprocess.batch_nhwc(images[i : i + self.batch_size], self.prep))[0]
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, NUM_CLASSES), dtype=np.float32)

    def outputs(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits (N, C), pooled features (N, K), uint8 model inputs (N, H, W, 3)) for RGB images:
        what fitting and measuring the out-of-distribution gate needs."""
        logits, features, inputs = [], [], []
        for i in range(0, len(images), self.batch_size):
            batch = preprocess.batch_nhwc(images[i : i + self.batch_size], self.prep)
            out, fmap = self.forward(batch, features=True)
            assert fmap is not None
            logits.append(out)
            features.append(ood.pooled(fmap))
            inputs.append(self._pixels(batch))
        return np.concatenate(logits), np.concatenate(features), np.concatenate(inputs)

    def _pixels(self, batch: np.ndarray) -> np.ndarray:
        """The normalised batch back as the uint8 model input (what the gate's image checks read, the
        same when the gate is fitted and when it serves)."""
        scale = np.asarray(self.prep.std, np.float32) * 255.0
        pixels = batch * scale + np.asarray(self.prep.mean, np.float32) * 255.0
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def decide(
        self, logits: np.ndarray, batch: np.ndarray | None = None, fmap: np.ndarray | None = None
    ) -> list[Prediction]:
        """Decisions for ``logits``; with the normalised ``batch`` and its feature map, the gate too."""
        gated: list[tuple[str, ...]] = [() for _ in range(len(logits))]
        if self.gate is not None and batch is not None and fmap is not None:
            gated = self.gate.reasons(self.gate.scores(self._pixels(batch), logits, ood.pooled(fmap)))
        probabilities = self.policy.probabilities(logits)
        labels = self.policy.labels(probabilities)
        uncertainty = self.policy.uncertainty(probabilities)
        reasons = self.policy.referral_reasons(probabilities, labels)
        out = []
        for p, label, u, why, odd in zip(probabilities, labels, uncertainty, reasons, gated, strict=True):
            out.append(
                Prediction(
                    label=CLASSES[int(label)],
                    probabilities={c: float(v) for c, v in zip(CLASSES, p, strict=True)},
                    confidence=float(p[int(label)]),
                    uncertainty=float(u),
                    referral=bool(why),
                    referral_reasons=why,
                    out_of_distribution=bool(odd),
                    ood_reasons=odd,
                )
            )
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """One :class:`Prediction` per RGB image, in order (gated when the model has a gate)."""
        return [
            a.prediction
            for i in range(0, len(images), self.batch_size)
            for a in self.classify_many(images[i : i + self.batch_size], keep_features=False)
        ]

    def explain(self, image: Image.Image, class_code: str | None = None) -> Explanation:
        """Grad-CAM of ``class_code`` (default: the predicted label) over ``image``."""
        explanation = self.analyze(image, class_code=class_code)[1]
        assert explanation is not None  # analyze explains unless told not to
        return explanation

    def analyze(
        self, image: Image.Image, *, class_code: str | None = None, explain: bool = True
    ) -> tuple[Prediction, Explanation | None]:
        """Classification and (optionally) its heat map, sharing one forward pass where possible."""
        analysis = self.classify(image, keep_features=explain)
        return analysis.prediction, (self.explain_analysis(image, analysis, class_code) if explain else None)

    def classify(self, image: Image.Image, *, keep_features: bool = True) -> Analysis:
        """Classify one image, keeping what a later :meth:`explain_analysis` needs to avoid a second pass."""
        return self.classify_many([image], keep_features=keep_features)[0]

    def classify_many(self, images: Sequence[Image.Image], *, keep_features: bool = True) -> list[Analysis]:
        """:meth:`classify` for several images in one forward pass (a GPU worker's dynamic batch).

        The answers equal one-at-a-time classification up to floating-point reassociation.
        """
        if not images:
            return []
        batch = preprocess.batch_nhwc(images, self.prep)
        want = (keep_features and self.cam_weight is not None) or self.gate is not None
        logits, fmap = self.forward(batch, features=want)
        keep = fmap if keep_features and self.cam_weight is not None else None
        return [
            Analysis(prediction, batch[i : i + 1], None if keep is None else keep[i])
            for i, prediction in enumerate(self.decide(logits, batch, fmap))
        ]

    def explain_analysis(self, image: Image.Image, analysis: Analysis, class_code: str | None = None) -> Explanation:
        """The heat map for a classified image: from the kept feature map (one pass) or by gradients."""
        started = time.perf_counter()
        code = class_code or analysis.prediction.label
        index = CLASSES.index(code)
        if self.cam_weight is not None:
            features = analysis.features
            if features is None:  # classified without keeping it: one more forward pass, still no gradients
                features = self._features(analysis.batch)
            cam, method = class_activation_map(features, self.cam_weight, index), "cam"
        else:
            cam, method = self.backend.gradcam(analysis.batch, index), "gradcam"
        heat, png = heatmap.render(image, cam, self.overlay_max_side)
        return Explanation(code, heat, png, method, time.perf_counter() - started)

    def heatmap_only(self, image: Image.Image, class_code: str) -> np.ndarray:
        """(h, w) Grad-CAM at feature resolution, for tests and comparisons."""
        batch = preprocess.batch_nhwc([image], self.prep)
        index = CLASSES.index(class_code)
        if self.cam_weight is not None:
            return class_activation_map(self._features(batch), self.cam_weight, index)
        return self.backend.gradcam(batch, index)

    def _features(self, batch: np.ndarray) -> np.ndarray:
        _, fmap = self.forward(batch, features=True)
        assert fmap is not None
        return fmap[0]

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
                "backend": self.info.backend,
                "tta": self.tta,
                "cam": self.cam_weight is not None,
            }
        )
