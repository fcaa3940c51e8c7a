"""Export a registry entry to ONNX for the ONNX Runtime backends: fp32, and static int8 from training images.

    python -m ml.export --model ml/registry/<model-id> [--data ../shared/data/ham10000]

Writes into the entry, and records in its manifest with their SHA-256 (so a changed file is refused
like changed weights):

- ``model.onnx`` (artefact ``onnx_fp32``): the float32 graph ``input`` -> ``logits``, ``features``,
  ``pooled`` (:mod:`ml.onnx_graph`), checked against torch on export: logits within 1e-4.
  ``--pooled-output`` gives an entry's graph exported before graphs had ``pooled`` that output, in
  place and without exporting again (the same computation to the bit, checked on a probe batch).
- ``model.int8.onnx`` (artefact ``onnx_int8``), only with ``--data``: ONNX Runtime static
  quantisation (QDQ, per-channel int8 weights, uint8 activations; :mod:`ml.quantize`) calibrated on
  ``--calibration-images`` images of the entry's *training* split, cut as the manifest records
  (:class:`ml.data.SplitSpec`, and the dataset digest must match).
- ``manifest["serving"]``: the default backend for ``backend="auto"``. With ``--data``, fp32 and
  int8 are compared on the validation split (balanced accuracy of each, and ``top1_agreement``:
  the share of images where int8 gives fp32's label, and the share each graph gets flagged out of
  distribution by the entry's gate); int8 becomes the default only if it meets the rule
  :mod:`ml.serving_choice` states (balanced accuracy within one point of fp32's, 99% top-class
  agreement, as many referrals, and the gate refusing about the same images). Without data, fp32 ONNX.

Only a global-average-pooling + linear head can be exported (the ONNX backends draw the heat map from
the feature map and the classifier weights); other heads are refused with :class:`ExportError`.
Needs the ``export`` extra (onnx, onnxscript); serving needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml import backends, preprocess, registry
from ml import data as ds
from ml.labels import CLASSES
from ml.onnx_graph import OPSET, ExportError, check_fp32, check_pooled, classifier_key, export_fp32, with_pooled_output
from ml.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_samples,
    decode_samples,
    quantize_int8,
    training_split,
)
from ml.serving_choice import compare_on_validation, decide_serving

__all__ = ["ExportError", "export_entry", "main", "run"]


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
            outputs=[*backends.OUTPUTS, backends.POOLED],
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


def add_pooled_output(model: str | Path) -> dict[str, Any]:
    """Give an entry's fp32 graph the ``pooled`` output (:func:`ml.onnx_graph.with_pooled_output`) in
    place, without exporting it again; returns the manifest's new record of the graph.

    The graph before and after run on a probe batch must give the same logits and feature map, to the
    bit, and the new output must be the feature map's mean; else :class:`ExportError` and nothing
    changes. A graph that has the output already is left as it is."""
    entry = registry.resolve(model)
    manifest = registry.read_manifest(entry)
    record = manifest.get("files", {}).get("onnx_fp32")
    if record is None:
        raise registry.RegistryError(f"{entry.name} has no fp32 ONNX graph; run python -m ml.export --model {entry}")
    before = registry.read_verified(entry, "onnx_fp32")
    after = with_pooled_output(before)
    if after == before:
        return dict(record)
    height, width = manifest["preprocessing"]["input_size"]
    probe = np.random.default_rng(0).normal(0, 1, (3, 3, height, width)).astype(np.float32)
    old = backends.create_session(before).run(list(backends.OUTPUTS), {backends.INPUT: probe})
    logits, features, pooled = backends.create_session(after).run(
        [*backends.OUTPUTS, backends.POOLED], {backends.INPUT: probe}
    )
    if not (np.array_equal(old[0], logits) and np.array_equal(old[1], features)):
        raise ExportError("the graph with the pooled output does not give the same logits and feature map")
    check_pooled(features, pooled)
    kept = {key: value for key, value in record.items() if key not in ("path", "sha256", "bytes")}
    kept["outputs"] = [*backends.OUTPUTS, backends.POOLED]
    kept["pooled_output"] = f"named by ml.onnx_graph.with_pooled_output in the graph with SHA-256 {record['sha256']}"

    def produce(path: Path) -> dict[str, Any]:
        path.write_bytes(after)
        return {}

    return _write_artefact(entry, "onnx_fp32", record["path"], produce, **kept)


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
        seed = ds.SplitSpec.from_record(manifest["data"]).seed
        chosen = calibration_samples(split.train, calibration_images, seed)
        calibration = decode_samples(chosen)
        info = {
            "split": "train",
            "selection": f"round-robin over classes, shuffled with seed {seed}",
            "decode": "ml.served_decode.decode_as_served + ml.preprocess",
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
    p.add_argument(
        "--pooled-output",
        action="store_true",
        help="only give the entry's existing fp32 graph its pooled output, in place (no export, no data)",
    )
    args = p.parse_args(argv)
    try:
        if args.pooled_output:
            print(json.dumps(add_pooled_output(args.model)))
            return 0
        serving = run(args.model, args.data, calibration_images=args.calibration_images, threads=args.threads)
    except (ExportError, registry.RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(serving))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
