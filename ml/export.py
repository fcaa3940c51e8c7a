"""Export a registry entry to ONNX for the ONNX Runtime backends: fp32, and static int8 from training images.

    python -m ml.export --model ml/registry/<model-id> [--data ../shared/data/ham10000]

Writes into the entry, and records in its manifest with their SHA-256 (so a changed file is refused
like changed weights):

- ``model.onnx`` (artefact ``onnx_fp32``): the float32 graph ``input`` (N, 3, H, W) ->
  ``logits`` (N, C) and ``features`` (N, K, h, w), i.e. ``forward_head(forward_features(x))`` and
  the feature map itself, with a dynamic batch axis. Exported by torch's ``torch.export``-based
  exporter (``dynamo=True``, needs onnxscript): in torch 2.14 the TorchScript exporter is deprecated
  (it warns that it will be removed) and names the feature map's axes wrongly, while the new one
  gives the same numbers and clean shapes. The weights are float16 on disk; the graph is float32.
  Checked against torch on export: logits within 1e-4.
- ``model.int8.onnx`` (artefact ``onnx_int8``), only with ``--data``: ONNX Runtime static
  quantisation (QDQ, per-channel int8 weights, uint8 activations; see :func:`quantize_int8`)
  calibrated on ``--calibration-images`` images of the entry's *training* split, reproduced from
  the manifest (split seed, fractions, dataset digest) and passed through the serving decode and
  preprocessing (with their mirror images when the entry uses flip TTA, as serving does).
- ``manifest["serving"]``: the default backend for ``backend="auto"``. With ``--data``, fp32 and
  int8 are compared on the validation split (balanced accuracy of each, and ``top1_agreement``:
  the share of images where int8 gives fp32's label); int8 becomes the default only if its balanced
  accuracy is within one point of fp32's (:mod:`ml.serving_choice`). Without data, fp32 ONNX.

The ONNX backends compute the heat map from the feature map and the classifier weights (the one-pass
Grad-CAM), which is exact only for a global-average-pooling + linear head: other heads are refused.
Needs the ``export`` extra (onnx, onnxscript); serving needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml import backends, preprocess, registry
from ml import data as ds
from ml.labels import CLASSES
from ml.model import Preprocessing
from ml.serving_choice import compare_on_validation, decide_serving

OPSET = 18
DEFAULT_CALIBRATION_IMAGES = 200
EXPORT_ATOL = 1e-4
CALIBRATION_BATCH = 8
CALIBRATION_REDUCE_TO = 1024  # at least the worker's overlay_max_side (its decode path); 200x150 images are unaffected


class ExportError(RuntimeError):
    """The model cannot be exported (or the export does not reproduce it)."""


class _WithFeatures(nn.Module):
    """``x`` -> (logits, last feature map): the two outputs the ONNX backends read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a timm model: forward_features / forward_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap), fmap


def classifier_key(model: nn.Module) -> str:
    """The state-dict key of the classifier weight whose rows make the one-pass Grad-CAM.

    Raises :class:`ExportError` unless the head is global average pooling + one linear layer.
    """
    from ml.gradcam import linear_gap_head

    if linear_gap_head(model) is None:
        raise ExportError(
            f"{type(model).__name__}'s head is not global average pooling + one linear layer, so its heat map "
            "cannot be computed from the feature map alone; the ONNX backends need that. Serve this model with "
            "backend='torch' (gradient Grad-CAM)"
        )
    classifier = model.get_classifier()  # type: ignore[operator]  # timm's, checked by linear_gap_head
    name = next(n for n, m in model.named_modules() if m is classifier)
    return f"{name}.weight" if name else "weight"


def export_fp32(model: nn.Module, prep: Preprocessing, path: Path, *, opset: int = OPSET) -> None:
    """Write ``model`` (float32, eval) as a single-file ONNX graph ``input`` -> ``logits``, ``features``."""
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    height, width = prep.input_size
    example = torch.zeros(2, 3, height, width)
    program = torch.onnx.export(
        _WithFeatures(model).eval(),
        (example,),
        input_names=[backends.INPUT],
        output_names=list(backends.OUTPUTS),
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        external_data=False,
        verbose=False,
    )
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def check_fp32(model: nn.Module, onnx_bytes: bytes, batch_nhwc: np.ndarray) -> float:
    """Largest |logit| difference between ONNX Runtime and torch on ``batch_nhwc``; raises past 1e-4."""
    session = backends.create_session(onnx_bytes)
    x = np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        expected, fmap = (t.numpy() for t in _WithFeatures(model)(torch.from_numpy(x)))
    logits, features = session.run(list(backends.OUTPUTS), {backends.INPUT: x})
    error = float(np.abs(logits - expected).max())
    if features.shape != fmap.shape or not error <= EXPORT_ATOL:
        raise ExportError(
            f"the ONNX graph does not reproduce the model: logits differ by {error:.2e} (limit {EXPORT_ATOL}), "
            f"feature map {features.shape} vs {fmap.shape}"
        )
    return error


# ---------------------------------------------------------------- calibration data


def training_split(manifest: dict[str, Any], data: str | Path) -> ds.Split:
    """The entry's lesion-level split of ``data``, refused unless it is the data the model was trained on."""
    info = manifest.get("data") or {}
    samples = ds.read_dataset(data)
    if not info.get("digest"):
        raise ExportError("the manifest records no data digest, so its training split cannot be reproduced")
    digest = ds.dataset_digest(samples)
    if digest != info["digest"]:
        raise ExportError(
            f"{data} is not the data this model was trained on (digest {digest[:12]}..., the manifest records "
            f"{info['digest'][:12]}...); calibrating on it could use test images. Point --data at the training data"
        )
    return ds.recorded_split(samples, info)


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


def decode_samples(samples: Sequence[ds.Sample], reduce_to: int = CALIBRATION_REDUCE_TO) -> list[Image.Image]:
    """The images as the worker sees them: :func:`ml.images.decode` with draft mode down to ``reduce_to``."""
    from ml.images import ImageLimits, decode_image

    limits = ImageLimits(min_side=8)
    return [decode_image(s.path.read_bytes(), limits, reduce_to=reduce_to) for s in samples]


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


# ---------------------------------------------------------------- the entry


def _write_artefact(
    entry: Path, artefact: str, filename: str, produce: Callable[[Path], dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """Let ``produce(path)`` write a temporary file (returning facts to record), move it into place,
    and record it with its SHA-256 under ``files[artefact]``."""
    fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{filename}.", suffix=".tmp")
    os.close(fd)
    try:
        facts = produce(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, entry / filename)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return registry.record_file(entry, artefact, filename, **extra, **facts)


def _forget(entry: Path, artefact: str) -> None:
    manifest = registry.read_manifest(entry)
    if manifest.get("files", {}).pop(artefact, None) is not None:
        registry.write_json_atomic(entry / registry.MANIFEST, manifest)


def export_entry(
    model: str | Path,
    *,
    calibration: Sequence[Image.Image] | None = None,
    calibration_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model.onnx`` (and ``model.int8.onnx`` when ``calibration`` images are given) into an entry.

    Returns the manifest records written. Raises :class:`ExportError` for a model the ONNX backends
    cannot serve, and :class:`ml.registry.RegistryError` for a bad entry.
    """
    from ml.predictor import Predictor

    entry = registry.resolve(model)
    torch_predictor = Predictor.load(entry, device="cpu", backend="torch")
    net = torch_predictor.model
    assert net is not None
    key = classifier_key(net)
    net = net.float().eval().to(memory_format=torch.contiguous_format)
    prep = torch_predictor.prep
    weights_sha = torch_predictor.info.weights_sha256
    common = {"format": "onnx", "opset": OPSET, "source_weights_sha256": weights_sha, "classifier": key}
    height, width = prep.input_size
    probe = np.random.default_rng(0).normal(0, 1, (3, height, width, 3)).astype(np.float32)
    if calibration:
        probe = np.concatenate([probe, preprocess.batch_nhwc(list(calibration[:5]), prep)])

    def produce_fp32(path: Path) -> dict[str, Any]:
        export_fp32(net, prep, path)
        return {"max_logit_error": check_fp32(net, path.read_bytes(), probe)}

    records = {
        "onnx_fp32": _write_artefact(
            entry,
            "onnx_fp32",
            backends.ONNX_FILES["onnx"][1],
            produce_fp32,
            precision="float32",
            exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            outputs=list(backends.OUTPUTS),
            **common,
        )
    }
    if calibration:
        hflip = torch_predictor.tta == "hflip"

        def produce_int8(path: Path) -> dict[str, Any]:
            return {
                "source_onnx_sha256": records["onnx_fp32"]["sha256"],
                "quantization": quantize_int8(entry / "model.onnx", path, calibration, prep, hflip),
                "calibration": {"images": len(calibration), "mirrored": hflip, **(calibration_info or {})},
            }

        records["onnx_int8"] = _write_artefact(
            entry, "onnx_int8", backends.ONNX_FILES["onnx-int8"][1], produce_int8, precision="int8", **common
        )
    else:
        stale = registry.read_manifest(entry).get("files", {}).get("onnx_int8")
        if stale is not None and stale.get("source_weights_sha256") != weights_sha:
            _forget(entry, "onnx_int8")
    return records


def run(
    model: str | Path,
    data: str | Path | None = None,
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    threads: int = backends.DEFAULT_THREADS,
) -> dict[str, Any]:
    """Export, quantise (with ``data``), compare and set the serving default; returns ``manifest["serving"]``."""
    entry = registry.resolve(model)
    manifest = registry.read_manifest(entry)
    calibration: list[Image.Image] | None = None
    info: dict[str, Any] = {}
    if data is not None:
        split = training_split(manifest, data)
        seed = int(manifest["data"].get("split_seed", ds.SPLIT_SEED))
        chosen = calibration_samples(split.train, calibration_images, seed)
        calibration = decode_samples(chosen)
        info = {
            "split": "train",
            "selection": f"round-robin over classes, shuffled with seed {seed}",
            "decode": f"ml.images.decode(reduce_to={CALIBRATION_REDUCE_TO}) + ml.preprocess",
            "image_ids_sha256": registry.sha256_bytes("\n".join(s.image_id for s in chosen).encode()),
            "per_class": {c: sum(s.dx == c for s in chosen) for c in CLASSES},
        }
        print(f"calibrating int8 on {len(chosen)} training images", file=sys.stderr)
    print(f"exporting {entry.name}", file=sys.stderr)
    records = export_entry(entry, calibration=calibration, calibration_info=info)
    comparison = None
    if data is not None:
        print("comparing fp32 and int8 on the validation split", file=sys.stderr)
        comparison = compare_on_validation(entry, data, threads=threads)
    serving = decide_serving(comparison, "onnx_int8" in records)
    manifest = registry.read_manifest(entry)
    manifest["serving"] = serving
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    return serving


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry entry folder or model id")
    p.add_argument("--data", help="the HAM10000-layout folder the model was trained on: int8 calibration + test")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    p.add_argument("--threads", type=int, default=backends.DEFAULT_THREADS, help="ONNX Runtime threads to evaluate")
    args = p.parse_args(argv)
    try:
        serving = run(args.model, args.data, calibration_images=args.calibration_images, threads=args.threads)
    except (ExportError, registry.RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(serving))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
