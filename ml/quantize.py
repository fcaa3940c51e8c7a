"""Static int8 quantisation of an exported graph, calibrated on images of the entry's training split.

The calibration images are :data:`DEFAULT_CALIBRATION_IMAGES` training images, dealt round-robin
over the classes, from the split the manifest records (:class:`ml.data.SplitSpec`), refused unless
the data's digest is the one the model was trained on; they pass through the serving decode and
preprocessing, with their mirror images when the entry uses flip TTA, as serving does.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml import backends, preprocess
from ml import data as ds
from ml.labels import CLASSES
from ml.model import Preprocessing
from ml.onnx_graph import ExportError

DEFAULT_CALIBRATION_IMAGES = 200
CALIBRATION_BATCH = 8


def training_split(manifest: dict[str, Any], data: str | Path) -> ds.Split:
    """The entry's lesion-level split of ``data``, refused unless it is the data the model was trained on."""
    info = manifest.get("data") or {}
    samples = ds.used_samples(manifest, ds.read_dataset(data))
    try:
        ds.check_training_data(info, samples, data)
    except ValueError as exc:  # calibrating on other data could use test images
        raise ExportError(str(exc)) from None
    return ds.SplitSpec.from_record(info).apply(samples)


def calibration_samples(train: Sequence[ds.Sample], count: int, seed: int) -> list[ds.Sample]:
    """Up to ``count`` training samples, dealt round-robin over the classes (each shuffled with ``seed``).

    Rare classes get their share of the activation ranges instead of two thirds going to naevi.
    """
    by_class: dict[str, list[ds.Sample]] = defaultdict(list)
    for sample in sorted(train, key=lambda s: s.image_id):
        by_class[sample.dx].append(sample)
    rng = random.Random(seed)
    queues = []
    for code in CLASSES:
        members = by_class.get(code, [])
        rng.shuffle(members)
        queues.append(members)
    chosen: list[ds.Sample] = []
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        chosen.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return chosen[:count]


def decode_samples(samples: Sequence[ds.Sample]) -> list[Image.Image]:
    """The images as the worker sees them (:func:`ml.served_decode.decode_as_served`)."""
    from ml.images import ImageLimits
    from ml.served_decode import decode_as_served

    limits = ImageLimits(min_side=8)
    return [decode_as_served(s.path.read_bytes(), limits).image for s in samples]


class _CalibrationReader:
    """Feeds preprocessed batches (with their mirror images when the entry uses flip TTA) to the calibrator."""

    def __init__(self, images: Sequence[Image.Image], prep: Preprocessing, hflip: bool) -> None:
        self._batches = self._generate(images, prep, hflip)

    @staticmethod
    def _generate(images: Sequence[Image.Image], prep: Preprocessing, hflip: bool) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(images), CALIBRATION_BATCH):
            batch = preprocess.batch_nhwc(images[start : start + CALIBRATION_BATCH], prep).transpose(0, 3, 1, 2)
            x = np.concatenate([batch, batch[..., ::-1]]) if hflip else batch
            yield {backends.INPUT: np.ascontiguousarray(x, dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._batches


def quantize_int8(
    fp32_path: Path, out: Path, images: Sequence[Image.Image], prep: Preprocessing, hflip: bool
) -> dict[str, Any]:
    """Static QDQ int8 quantisation of ``fp32_path`` into ``out``, calibrated on ``images``; returns its settings.

    Activation ranges are the mean over calibration batches of each batch's minimum and maximum
    (ORT's MinMax with ``CalibMovingAverage``), which ignores the rare extreme that a global min/max
    would stretch every range to: on held-out lesions that agreed more often with fp32 (98.0% against
    96.5% of labels on the validation split of the first model). The stem convolution, which reads
    the raw image, and the classifier stay in float: they cost little and keep the heat map's weights
    exactly the graph's. ``CalibMaxIntermediateOutputs`` is deliberately not used: in ONNX Runtime
    1.32 it discards collected ranges instead of merging them (onnxruntime#18893).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ExportError("int8 quantisation needs calibration images; none were given")
    with tempfile.TemporaryDirectory(prefix="dermq-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        graph = onnx.load(str(prepared)).graph
        stem = [n.name for n in graph.node if n.op_type == "Conv" and backends.INPUT in n.input]
        classifier = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        quantize_static(
            str(prepared),
            str(out),
            _CalibrationReader(images, prep, hflip),  # duck-typed: get_next() is all ORT calls
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=stem + classifier,
            extra_options={"CalibMovingAverage": True},
        )
    return {
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",  # u8s8: the fast path of x86 VNNI kernels, no saturation with VNNI
        "reduce_range": False,
        "calibration_method": "MinMax, mean of per-batch extremes",
        "calibration_batch": CALIBRATION_BATCH,
        "float_nodes": stem + classifier,
    }
