"""Serving a registry entry: calibrated predictions and Grad-CAM heat maps for PIL images.

    predictor = Predictor.load("ml/registry/<model-id>")     # verifies the SHA-256 first
    analysis = predictor.classify([image])[0]                 # serving: decision + what the heat map needs
    explanation = predictor.explain(image, analysis)          # heat map + PNG overlay, no second pass
    predictions = predictor.predict(images)                   # evaluation: decisions only, batched

What each method returns:

- :meth:`Predictor.classify`: one :class:`Analysis` per image (its :class:`Prediction` and the
  model input and feature map), from one forward pass over the images given;
- :meth:`Predictor.explain`: the :class:`Explanation` (heat map and overlay PNG) of an analysis;
- :meth:`Predictor.predict`: one :class:`Prediction` per image, in batches of ``batch_size``;
- :meth:`Predictor.logits` and :meth:`Predictor.outputs`: the raw model outputs (logits; with the
  pooled features and model inputs as :class:`ModelOutputs`) that evaluation, backend comparisons
  and the out-of-distribution gate's fitting read.

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from torch import nn

from ml import backend_choice, backends, heatmap, ood, preprocess, registry
from ml import model as models
from ml.answers import Analysis, Explanation, ModelInfo, ModelOutputs, Prediction
from ml.backends import Backend, Pass, TorchBackend, resolve_device
from ml.decision import DecisionPolicy, NonFiniteOutput
from ml.gradcam import class_activation_map
from ml.labels import CLASSES, NUM_CLASSES

#: test-time augmentation: none, or each image and its mirror image averaged
TTA_MODES = ("none", "hflip")


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
        if tta not in TTA_MODES:
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

        ``backend`` is ``auto``, ``torch``, ``onnx`` or ``onnx-int8`` (see :func:`ml.backend_choice.choose`);
        ONNX Runtime runs on the CPU with ``threads`` intra-op threads. Raises
        :class:`ml.registry.IntegrityError` for a tampered file and :class:`ml.registry.RegistryError`
        for anything else wrong with the entry (an ONNX backend it was not exported for, included).
        ``info.manifest_sha256`` is the SHA-256 of the manifest bytes parsed: what a pin is checked against.
        """
        entry = registry.resolve(path)
        manifest, digest = registry.load_manifest(entry)  # one read: every file is checked against it
        if tuple(manifest.get("classes", ())) != CLASSES:
            raise registry.RegistryError(
                f"{entry.name}: class order {manifest.get('classes')} differs from dermq's {list(CLASSES)}"
            )
        if backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)}")
        # ONNX Runtime serves on the CPU: "auto" means the CPU there (and CUDA is never touched for it)
        target = torch.device("cpu") if backend in backends.ONNX_FILES and device == "auto" else resolve_device(device)
        try:  # a field the entry lacks or mistypes is the entry's fault, told as such (not a KeyError)
            predictor = cls._load_entry(entry, manifest, backend, target, threads, **kwargs)
        except (KeyError, TypeError, AttributeError) as exc:  # AttributeError: a list where an object belongs
            raise registry.RegistryError(f"{entry.name}: the manifest lacks or mistypes {exc}") from exc
        predictor.info.manifest_sha256 = digest
        return predictor

    @classmethod
    def _load_entry(
        cls, entry: Path, manifest: dict[str, Any], backend: str, target: torch.device, threads: int, **kwargs: Any
    ) -> Predictor:
        try:  # first: an ONNX graph is checked against the input size
            prep = models.Preprocessing.from_dict(manifest["preprocessing"])
            if prep.interpolation not in preprocess.INTERPOLATIONS:
                raise ValueError(f"unknown interpolation {prep.interpolation!r}")
            policy = DecisionPolicy.from_dict(manifest["decision"])
        except (KeyError, TypeError, ValueError) as exc:
            raise registry.RegistryError(f"{entry.name}: the manifest's preprocessing or decision: {exc}") from exc
        chosen = backend_choice.choose(manifest, backend, target)
        engine: nn.Module | Backend
        if chosen == "torch":
            engine = cls._load_torch(entry, manifest)
            served = manifest["files"]["weights"]["sha256"]
        else:
            if target.type != "cpu":
                raise ValueError(f"the {chosen} backend runs on the CPU, not {target}; use backend='torch' there")
            engine = backends.load_onnx(entry, manifest, chosen, input_size=prep.input_size, threads=threads)
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
        if manifest.get("tta", "none") not in TTA_MODES:
            raise registry.RegistryError(f"{entry.name}: unknown test-time augmentation {manifest['tta']!r}")
        return cls(
            engine,
            prep,
            policy,
            device=target,
            info=info,
            tta=manifest.get("tta", "none"),
            gate=cls._load_gate(entry, manifest),
            **kwargs,
        )

    @staticmethod
    def _load_gate(entry: Path, manifest: dict[str, Any]) -> ood.OODGate | None:
        """The entry's out-of-distribution gate, or None when its manifest has no ``ood`` section (v1 entries)."""
        section = manifest.get("ood")
        if not section:
            return None
        from safetensors.numpy import load as load_numpy

        try:
            arrays = load_numpy(registry.read_verified(entry, "ood", manifest=manifest))
            return ood.OODGate.from_arrays(
                arrays, ood.checked_thresholds(section["thresholds"]), section.get("pixel_stride", 1)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise registry.RegistryError(f"{entry.name}: the out-of-distribution gate does not load: {exc}") from exc

    @staticmethod
    def _load_torch(entry: Path, manifest: dict[str, Any]) -> nn.Module:
        data = registry.read_verified(entry, "weights", manifest=manifest)
        try:
            state = load_safetensors(data)
        except Exception as exc:
            raise registry.RegistryError(f"{entry.name}: weights file does not parse as safetensors") from exc
        try:
            net = models.create(manifest["architecture"], NUM_CLASSES)
        except RuntimeError as exc:  # timm: "Unknown model"
            raise registry.RegistryError(f"{entry.name}: {exc}") from exc
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise registry.RegistryError(f"{entry.name}: weights do not fit {manifest['architecture']}") from exc
        return net

    # ---------------------------------------------------------------- inference

    def classify(self, images: Sequence[Image.Image]) -> list[Analysis]:
        """One :class:`Analysis` per RGB image, in order, from one forward pass over all of them.

        This is what serving calls (one case, or a GPU worker's dynamic batch: the caller chooses the
        batch). Each analysis holds the decision (gated when the model has a gate) and what
        :meth:`explain` needs to draw the heat map without another forward pass. The answers equal
        one-at-a-time classification up to floating-point reassociation.
        """
        if not images:
            return []
        pixels, batch = preprocess.model_input(images, self.prep)
        out = self._forward(batch, features=self.cam_weight is not None, pooled=self.gate is not None)
        return [
            Analysis(prediction, batch[i : i + 1], None if out.features is None else out.features[i])
            for i, prediction in enumerate(self._decide(out.logits, pixels, out.pooled))
        ]

    def explain(self, image: Image.Image, analysis: Analysis, class_code: str | None = None) -> Explanation:
        """The Grad-CAM heat map of ``class_code`` (default: the analysis's label) over ``image``, the
        image :meth:`classify` gave ``analysis`` for.

        With a one-pass head the map comes from the analysis's feature map (one more forward pass,
        still without gradients, when the analysis has none); otherwise the torch backend computes it
        by gradients. Returns the map at feature resolution (``cam``) and at the overlay's size
        (``heatmap``), and the overlay PNG.
        """
        started = time.perf_counter()
        code = class_code or analysis.prediction.label
        index = CLASSES.index(code)
        if self.cam_weight is not None:
            features = analysis.features
            if features is None:
                features = self._features(analysis.batch)
            cam, method = class_activation_map(features, self.cam_weight, index), "cam"
        else:
            cam, method = self.backend.gradcam(analysis.batch, index), "gradcam"
        png = heatmap.render(image, cam, self.overlay_max_side)
        size = heatmap.overlay_size(image.size, self.overlay_max_side)
        return Explanation(code, cam, png, method, size, time.perf_counter() - started)

    def predict(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """One :class:`Prediction` per RGB image, in order (gated when the model has a gate).

        For evaluating many images: forward passes of ``batch_size`` images, keeping nothing for a
        heat map (use :meth:`classify` and :meth:`explain` for that).
        """
        predictions: list[Prediction] = []
        for i in range(0, len(images), self.batch_size):
            pixels, batch = preprocess.model_input(images[i : i + self.batch_size], self.prep)
            out = self._forward(batch, pooled=self.gate is not None)
            predictions.extend(self._decide(out.logits, pixels, out.pooled))
        return predictions

    def logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, C) float32 logits for RGB images, before calibration and decision, in batches of
        ``batch_size``: what comparing backends reads (:mod:`ml.serving_choice`)."""
        chunks = [
            self._forward(preprocess.batch_nhwc(images[i : i + self.batch_size], self.prep)).logits
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, NUM_CLASSES), dtype=np.float32)

    def outputs(self, images: Sequence[Image.Image]) -> ModelOutputs:
        """:class:`ModelOutputs` (logits, pooled features, uint8 model inputs) for RGB images, in
        batches of ``batch_size``: what fitting and measuring the out-of-distribution gate reads."""
        logits, features, inputs = [], [], []
        for i in range(0, len(images), self.batch_size):
            pixels, batch = preprocess.model_input(images[i : i + self.batch_size], self.prep)
            out = self._forward(batch, pooled=True)
            assert out.pooled is not None
            logits.append(out.logits)
            features.append(out.pooled)
            inputs.append(pixels)
        return ModelOutputs(np.concatenate(logits), np.concatenate(features), np.concatenate(inputs))

    def _forward(self, batch_nhwc: np.ndarray, *, features: bool = False, pooled: bool = False) -> Pass:
        """(N, H, W, 3) normalised float32 -> the logits (N, C) float32, and on request the last
        feature map (N, K, h, w) and the pooled features (N, K) (:class:`ml.backends.Pass`).

        With test-time flips the logits are the mean over the original and mirrored image; the
        feature map and pooled features are always the original image's.
        """
        return self.backend.forward(batch_nhwc, features=features, pooled=pooled, hflip=self.tta == "hflip")

    def _features(self, batch: np.ndarray) -> np.ndarray:
        """The (K, h, w) feature map of a one-image batch."""
        fmap = self._forward(batch, features=True).features
        assert fmap is not None
        return fmap[0]

    def _decide(
        self, logits: np.ndarray, pixels: np.ndarray | None = None, pooled: np.ndarray | None = None
    ) -> list[Prediction]:
        """Decisions for ``logits``; with the uint8 model input ``pixels`` and its pooled features, the gate too.
        :class:`NonFiniteOutput` if a row of logits is not all finite numbers: every test of the rule and
        the gate is false for NaN, which would read as a confident diagnosis no gate flags."""
        if not np.isfinite(logits).all():
            broken = int((~np.isfinite(logits).all(axis=1)).sum())
            raise NonFiniteOutput(f"the model gave non-finite scores for {broken} image(s)")
        gated: list[tuple[str, ...]] = [() for _ in range(len(logits))]
        if self.gate is not None and pixels is not None and pooled is not None:
            gated = self.gate.reasons(self.gate.scores(pixels, logits, pooled))
        probabilities = self.policy.probabilities(logits)
        if not np.isfinite(probabilities).all():  # a policy whose numbers overflow: never an answer
            raise NonFiniteOutput("the decision policy gave non-finite probabilities")
        labels, uncertainty = self.policy.labels_and_uncertainty(probabilities)
        reasons = self.policy.referral_reasons(probabilities, labels, uncertainty)
        out = []
        rows = zip(probabilities.tolist(), labels.tolist(), uncertainty.tolist(), reasons, gated, strict=True)
        for p, label, u, why, odd in rows:
            out.append(
                Prediction(
                    label=CLASSES[label],
                    probabilities=dict(zip(CLASSES, p, strict=True)),
                    confidence=p[label],
                    uncertainty=u,
                    referral=bool(why),
                    referral_reasons=why,
                    out_of_distribution=bool(odd),
                    ood_reasons=odd,
                )
            )
        return out

    # ---------------------------------------------------------------- operations

    def warm_up(self, rounds: int = 2, batch_sizes: Iterable[int] = (1,)) -> None:
        """Run a few dummy images so the first real case pays no one-off costs: ``rounds`` cases
        (classification and heat map), then one classification at each batch shape that
        ``batch_sizes`` run at (:meth:`ml.backends.Backend.batch_shape`), for an engine that prepares
        each new shape on first use (cuDNN on a GPU)."""
        height, width = self.prep.input_size
        blank = Image.new("RGB", (width, height), (128, 100, 90))
        for _ in range(rounds):
            self.explain(blank, self.classify([blank])[0])
        for size in sorted({self.backend.batch_shape(n) for n in batch_sizes} - {1}):
            self.classify([blank] * size)

    def describe(self) -> str:
        """A one-line JSON summary for logs: model id, device, backend, TTA and whether the heat map is one-pass."""
        return json.dumps(
            {
                "model_id": self.info.model_id,
                "device": str(self.device),
                "backend": self.info.backend,
                "tta": self.tta,
                "cam": self.cam_weight is not None,
            }
        )
