"""A registry entry's weights served another way: a new entry, fitted and measured again.

    python -m ml.refit --source ml/registry/<id> --out ml/registry/<new-id> --data ../shared/data/ham10000 \\
        [--interpolation bicubic-antialiased] [--gate-stride 2]
    python -m ml.export --model ml/registry/<new-id> --data ../shared/data/ham10000   # then, as after training

The resampler (:mod:`ml.preprocess`) and the gate's pixel stride (:mod:`ml.ood`) decide answers, so
weights served with another of either are another model, with their own thresholds and figures. This
writes a work folder (``<out>.work``) as a finished training run would have left it: the source's
verified weights (widened to float32: its float16 values exactly), its training configuration (the
resampler it was trained with included), its training environment and the per-epoch history (from
its manifest and its model card), and a ``refit.json`` saying where the weights come from and what
this entry changes (its resampler and gate stride; what is not given stays the source's). Then
:func:`ml.finalize.finalize` does what it does after any training: calibration, decision rule,
referral thresholds and gate fitted on the validation split with the new preprocessing, the test split
read once, a new model card. The weights are not trained again; the manifest says so
(``training.refit_of``), and so does the card.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ml import data as ds
from ml import preprocess, registry
from ml.checkpoint import CHECKPOINT
from ml.recipe import TrainConfig, read_config

_HISTORY_ROW = re.compile(r"^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$")


def history_from_card(card: str) -> list[dict[str, Any]]:
    """The per-epoch rows of a model card's "Training history" table (rounded as printed there)."""
    _, _, section = card.partition("## Training history")
    rows = [_HISTORY_ROW.match(line.strip()) for line in section.splitlines()]
    return [
        {
            "epoch": int(m[1]),
            "train_loss": float(m[2]),
            "val_balanced_accuracy": float(m[3]),
            "val_accuracy": float(m[4]),
            "minutes": float(m[5]),
        }
        for m in rows
        if m is not None
    ]


def prepare(source: Path, out: Path, data: str, *, interpolation: str, gate_stride: int | None) -> TrainConfig:
    """Write the work folder for refitting ``source`` as ``out``; the configuration to finalise it with."""
    from ml.predictor import Predictor

    if interpolation and interpolation not in preprocess.INTERPOLATIONS:
        known = ", ".join(preprocess.INTERPOLATIONS)
        raise SystemExit(f"unknown interpolation {interpolation!r}; choose one of {known}")
    if gate_stride is not None and gate_stride < 1:
        raise SystemExit("--gate-stride is at least 1")
    loaded = Predictor.load(source, device="cpu", backend="torch")  # every file verified, as serving does
    assert loaded.model is not None
    manifest = loaded.info.manifest
    # what is not given stays the source's
    interpolation = interpolation or manifest["preprocessing"]["interpolation"]
    source_stride = loaded.gate.stride if loaded.gate is not None else 1
    gate_stride = source_stride if gate_stride is None else gate_stride
    try:  # the refit's own split (its calibration, gate and figures) is rebuilt from this data
        ds.check_training_data(manifest.get("data") or {}, ds.used_samples(manifest, ds.read_dataset(data)), data)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    training = manifest.get("training") or {}
    if "config" not in training:
        raise SystemExit(f"{source.name} records no training configuration to refit from")
    workdir = Path(f"{str(out).rstrip('/')}.work")
    workdir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(workdir / CHECKPOINT), metadata={"refit_of": manifest["model_id"]})
    config = {
        **training["config"],
        "data": data,
        "out": str(out),
        "workdir": str(workdir),
        "model_id": out.name,
        # what the weights were trained with, as it was: the entry's own resampler is refit.json's
        "interpolation": manifest["preprocessing"]["interpolation"],
        "gate_stride": gate_stride,
        "finalize_only": True,
    }
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    card = (source / "model_card.md").read_text() if (source / "model_card.md").is_file() else ""
    (workdir / "history.json").write_text(json.dumps(history_from_card(card), indent=2))
    if training.get("environment"):
        (workdir / "environment.json").write_text(json.dumps(training["environment"], indent=2))
    # no pixels.json: the source run's digests are of inputs this entry's resampler does not make
    refit = {
        "model_id": manifest["model_id"],
        "weights_sha256": manifest["files"]["weights"]["sha256"],
        "interpolation": [manifest["preprocessing"]["interpolation"], interpolation],
        "gate_stride": [source_stride, gate_stride],
        "source_pixels_sha256": manifest.get("data", {}).get("pixels_sha256") or {},
    }
    (workdir / "refit.json").write_text(json.dumps(refit, indent=2))
    return TrainConfig(**read_config(workdir / "config.json"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.refit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="registry entry whose weights the new entry serves")
    parser.add_argument("--out", required=True, help="the new registry entry's folder")
    parser.add_argument("--data", required=True, help="HAM10000-layout folder the source was trained on")
    parser.add_argument("--interpolation", default="", help="resampler (ml.preprocess); default: the source's")
    parser.add_argument(
        "--gate-stride", type=int, default=None, help="the gate's pixel stride (ml.ood); default: the source's"
    )
    args = parser.parse_args(argv)
    from ml.finalize import finalize

    source = registry.resolve(args.source)
    config = prepare(source, Path(args.out), args.data, interpolation=args.interpolation, gate_stride=args.gate_stride)
    finalize(config)


if __name__ == "__main__":
    main()
