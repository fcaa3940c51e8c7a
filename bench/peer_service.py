"""The BentoML peer of :mod:`bench.peer`: the same ``model.onnx`` behind BentoML's adaptive batching.

Run only by ``python -m bench.peer``, in its own virtual environment (``.venv-peer``, which has BentoML;
the project's does not), as ``bentoml serve bench.peer_service:PeerClassifier`` with the repository
root on ``PYTHONPATH``. Nothing in dermq imports this module.

What it answers is what a dermq case's result says about the label: ``POST /classify`` with one image
(multipart field ``images``) answers ``{"label", "probabilities"}``. The path to it is dermq's, from
the same modules: :func:`ml.images.decode` as the worker calls it (draft mode down to 512 pixels),
:func:`ml.preprocess.batch_nhwc` with the manifest's preprocessing, ONNX Runtime over the entry's
verified ``model.onnx`` with the session options of :func:`ml.backends.create_session`, and
:class:`ml.decision.DecisionPolicy` for the calibrated probabilities and the label. Those modules
need NumPy and Pillow, and PyTorch for an entry whose resampler is PyTorch's (the shipped v4). It does
not run the out-of-distribution gate or the referral rule (dermq's ``predict`` does: about 1 ms of its
case), draw a heat map, encrypt, store or audit anything.

Configured by the environment the benchmark sets: ``DERMQ_PEER_MODEL`` (registry entry),
``DERMQ_PEER_WORKERS``, ``DERMQ_PEER_THREADS`` (ONNX Runtime intra-op threads per worker),
``DERMQ_PEER_MAX_BATCH`` and ``DERMQ_PEER_MAX_LATENCY_MS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bentoml
import numpy as np

from ml import preprocess, registry
from ml.decision import DecisionPolicy
from ml.images import decode
from ml.labels import CLASSES

MODEL = os.environ.get("DERMQ_PEER_MODEL", registry.DEFAULT_MODEL)
WORKERS = int(os.environ.get("DERMQ_PEER_WORKERS", "2"))
THREADS = int(os.environ.get("DERMQ_PEER_THREADS", "1"))
MAX_BATCH = int(os.environ.get("DERMQ_PEER_MAX_BATCH", "8"))
MAX_LATENCY_MS = int(os.environ.get("DERMQ_PEER_MAX_LATENCY_MS", "60000"))  # BentoML's default
#: what the worker decodes to (DERMQ_OVERLAY_MAX_SIDE's default): JPEG draft mode down to this side
REDUCE_TO = 512


def preprocessing(manifest: dict[str, Any]) -> SimpleNamespace:
    """The manifest's preprocessing with the attributes :mod:`ml.preprocess` reads (``ml.model``'s
    dataclass would import torch)."""
    prep = manifest["preprocessing"]
    return SimpleNamespace(
        input_size=(int(prep["input_size"][0]), int(prep["input_size"][1])),
        mean=tuple(float(x) for x in prep["mean"]),
        std=tuple(float(x) for x in prep["std"]),
        interpolation=str(prep.get("interpolation", "bilinear")),
        colour_constancy=str(prep.get("colour_constancy", "none")),
    )


class OnnxClassifier:
    """Image bytes in, dermq's label and calibrated probabilities out, from one ONNX Runtime session."""

    def __init__(self, model: str = MODEL, threads: int = THREADS) -> None:
        import onnxruntime as ort

        manifest = registry.read_manifest(model)
        if manifest.get("tta", "none") != "none":
            raise SystemExit(f"{model} averages over flips (tta={manifest['tta']!r}); the peer serves plain entries")
        self.prep = preprocessing(manifest)
        self.policy = DecisionPolicy.from_dict(manifest["decision"])
        options = ort.SessionOptions()  # as ml.backends.create_session
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            registry.read_verified(model, "onnx_fp32"), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def classify(self, images: list[bytes]) -> list[dict[str, Any]]:
        """One ``{"label", "probabilities"}`` per image, from one forward pass over all of them."""
        decoded = [decode(data, reduce_to=REDUCE_TO).image for data in images]
        batch = preprocess.batch_nhwc(decoded, self.prep)  # type: ignore[arg-type]
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        (logits,) = self.session.run(["logits"], {"input": x})
        probabilities = self.policy.probabilities(logits.astype(np.float32, copy=False))
        labels = self.policy.labels(probabilities)
        return [
            {"label": CLASSES[int(label)], "probabilities": {c: float(v) for c, v in zip(CLASSES, p, strict=True)}}
            for p, label in zip(probabilities, labels, strict=True)
        ]


@bentoml.service(workers=WORKERS, threads=1, traffic={"timeout": 60})
class PeerClassifier:
    def __init__(self) -> None:
        self.classifier = OnnxClassifier()
        if self.classifier.prep.interpolation == preprocess.ANTIALIASED:  # PyTorch's resampler: this worker's threads
            import torch

            torch.set_num_threads(THREADS)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Path]) -> list[dict[str, Any]]:
        return self.classifier.classify([path.read_bytes() for path in images])
