"""Model benchmark: dermq's predictor on torch, ONNX Runtime fp32 and ONNX Runtime int8, against the naive way.

    python -m bench.model [--model ml/registry/<id>] [--baseline <id>] [--device auto] [--repeats 50] [--threads 2]

Every contender takes turns call by call, so a busy machine slows them alike: read the ratios.

dermq's way: preprocessing shared by every backend, batched, one-pass Grad-CAM from the feature map
of the same forward pass. torch runs in inference mode, channels-last; ONNX Runtime runs the graphs
``python -m ml.export`` wrote, with ``--threads`` intra-op threads. The naive way (the prototype's):
torch, contiguous float32 NCHW, one image at a time, autograd left on, Grad-CAM through a backward
pass. Prints load time (with the SHA-256 checks), single-image latency p50/p95, throughput at batch
8 and 32, classification + heat map latency (the CAM array; the PNG overlay is timed on its own row),
with ratios; then decoding and preprocessing a 4000x3000 JPEG fully and in JPEG draft mode.
Backends the entry has no ONNX file for are left out (run ``python -m ml.export`` first). With
``--baseline`` (default: the first shipped model) a last table compares the two entries' one-image
latency, classification and gate included, on the backend each serves by default, interleaved.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
from collections.abc import Callable

import numpy as np
import onnxruntime
import torch
from PIL import Image

from bench.common import FIXTURE_IMAGES, interleaved, ms, p50, percentile, table, timed
from bench.machine import processor
from ml import backend_choice, backends, heatmap, preprocess, registry
from ml.gradcam import GradCAM, class_activation_map
from ml.images import ImageLimits, decode
from ml.labels import CLASSES
from ml.predictor import Predictor
from worker.runtime import pin_blas

DEFAULT_MODEL = registry.DEFAULT_MODEL
BASELINE_MODEL = "effnet-lite0-ham10000-v1"
ONNX_BACKENDS = ("onnx", "onnx-int8")


def naive_single(predictor: Predictor, model: torch.nn.Module, image: Image.Image) -> np.ndarray:
    batch = preprocess.batch_nhwc([image], predictor.prep)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(predictor.device)
    return model(x).detach().cpu().numpy()


def naive_gradcam(predictor: Predictor, model: torch.nn.Module, image: Image.Image) -> np.ndarray:
    batch = preprocess.batch_nhwc([image], predictor.prep)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(predictor.device)
    cam, _ = GradCAM(model)(x)
    return cam


def classify_and_cam(predictor: Predictor, image: Image.Image) -> np.ndarray:
    """What the worker does before the overlay: classify, then the heat map array from the kept features."""
    analysis = predictor.classify([image])[0]
    index = CLASSES.index(analysis.prediction.label)
    if analysis.features is not None and predictor.cam_weight is not None:
        return class_activation_map(analysis.features, predictor.cam_weight, index)
    return predictor.backend.gradcam(analysis.batch, index)


def camera_jpeg(source: Image.Image, size: tuple[int, int] = (4000, 3000), quality: int = 90) -> bytes:
    """A camera-sized JPEG made in memory from a fixture image, upscaled."""
    out = io.BytesIO()
    source.resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto", help="device of the torch backend")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=backends.DEFAULT_THREADS, help="ONNX Runtime intra-op threads")
    parser.add_argument("--baseline", default=BASELINE_MODEL, help="entry to compare one-image latency with ('': none)")
    args = parser.parse_args(argv)
    # NumPy's BLAS (the gate's feature distance, the overlay's levels) on one thread, as in every
    # worker child: with a thread per core it competes with ONNX Runtime's threads
    pin_blas()
    backends.float32_on_cuda()  # with --device cuda, as the worker serves: float32 convolutions, not TF32

    images = [Image.open(p).convert("RGB") for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))]
    manifest = registry.read_manifest(args.model)
    names = ["torch"] + [n for n in ONNX_BACKENDS if backend_choice.onnx_available(manifest, n)]

    def loader(name: str) -> Callable[[], Predictor]:
        device = args.device if name == "torch" else "cpu"
        return lambda: Predictor.load(args.model, device=device, backend=name, threads=args.threads, batch_size=32)

    load_times = interleaved({name: loader(name) for name in names}, repeats=5, warmup=1)
    predictors = {name: loader(name)() for name in names}
    device = predictors["torch"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    naive_model = Predictor.load(args.model, device=args.device, backend="torch").model
    assert naive_model is not None
    naive_model = naive_model.to(memory_format=torch.contiguous_format)  # same weights, contiguous, autograd on
    naive_model.requires_grad_(True)
    reference = predictors["torch"]

    def ours_batch(predictor: Predictor, n: int) -> Callable[[], None]:
        def run() -> None:
            predictor.predict([images[i % len(images)] for i in range(n)])
            sync()

        return run

    def naive_batch(n: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(n):
                naive_single(reference, naive_model, images[i % len(images)])
            sync()

        return run

    r = args.repeats
    columns = ["naive", *names]

    def naive_cam() -> None:
        naive_single(reference, naive_model, images[0])
        naive_gradcam(reference, naive_model, images[0])

    # every contender takes turns call by call (see bench.common.interleaved): ratios survive a busy machine
    single = interleaved({"naive": naive_batch(1)} | {n: ours_batch(predictors[n], 1) for n in names}, r)
    b8 = interleaved({"naive": naive_batch(8)} | {n: ours_batch(predictors[n], 8) for n in names}, max(5, r // 5))
    b32 = interleaved({"naive": naive_batch(32)} | {n: ours_batch(predictors[n], 32) for n in names}, max(3, r // 10))
    cam = interleaved(
        {"naive": naive_cam} | {n: functools.partial(classify_and_cam, predictors[n], images[0]) for n in names}, r
    )
    overlay_cam = classify_and_cam(reference, images[0])
    overlay = timed(lambda: heatmap.render(images[0], overlay_cam), r)

    def row(label: str, values: dict[str, list[float]], stat: Callable[[list[float]], float] = p50) -> list[str]:
        cells = [label] + [ms(stat(values[c])) if c in values else "" for c in columns]
        base = stat(values["torch"])  # the ratios say how many times faster the right-hand side is
        cells.append(ratio(stat(values["naive"]), base) if "naive" in values else "")
        for name in ONNX_BACKENDS:
            cells.append(ratio(base, stat(values[name])) if name in values else "")
        return cells

    def throughput(label: str, values: dict[str, list[float]], n: int) -> list[str]:
        return [label] + [f"{n / p50(values[c]):.0f} img/s" if c in values else "" for c in columns] + [""] * 3

    def p95(values: list[float]) -> float:
        return percentile(values, 95)

    rows = [
        row("load (SHA-256 + build)", load_times),
        row("one image p50", single),
        row("one image p95", single, p95),
        row("batch of 8 (p50)", b8),
        throughput("  throughput", b8, 8),
        row("batch of 32 (p50)", b32),
        throughput("  throughput", b32, 32),
        row("classify + heat map p50", cam),
        row("classify + heat map p95", cam, p95),
    ]

    header = ["measure", *columns, "naive/torch", *(f"torch/{n}" for n in ONNX_BACKENDS)]
    print(
        f"model {manifest['model_id']} ({manifest['architecture']}, input {manifest['preprocessing']['input_size']}, "
        f"tta {manifest.get('tta', 'none')}); torch device {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; onnxruntime {onnxruntime.__version__}, {args.threads} threads; "
        f"{processor()}, {os.cpu_count()} CPUs; serving default "
        f"{manifest.get('serving', {}).get('default_backend', 'n/a')}"
    )
    print("images: the fixture JPEGs, preprocessing included; heat map = the Grad-CAM array (the overlay row adds")
    print("upsampling, blending and PNG encoding at the image's size); naive runs without the flip TTA")
    print(table(header, rows))
    width, height = images[0].size
    print(
        f"PNG overlay of the heat map ({width}x{height}: upsample, blend, encode), any backend: "
        f"p50 {ms(p50(overlay))}, p95 {ms(percentile(overlay, 95))}"
    )
    if missing := [n for n in ONNX_BACKENDS if n not in names]:
        print(f"not measured (no file in the entry; run python -m ml.export): {', '.join(missing)}")

    # ---------------------------------------------------------------- decoding a camera-sized upload
    data = camera_jpeg(images[0])
    prep = reference.prep
    limits = ImageLimits()

    def decode_and_preprocess(reduce_to: int | None) -> Callable[[], np.ndarray]:
        return lambda: preprocess.batch_nhwc([decode(data, limits, reduce_to=reduce_to).image], prep)

    worker = f"draft mode, reduce_to={heatmap.DEFAULT_MAX_SIDE} (worker)"
    settings = {"full decode": None, worker: heatmap.DEFAULT_MAX_SIDE}
    settings[f"draft mode, reduce_to={max(prep.input_size)}"] = max(prep.input_size)
    decode_times = interleaved({label: decode_and_preprocess(v) for label, v in settings.items()}, max(5, r // 2))
    full = decode_times["full decode"]
    variants = [(label, settings[label], decode_times[label]) for label in settings]
    decode_rows = []
    for label, reduce_to, times in variants:
        size = decode(data, limits, reduce_to=reduce_to).image.size
        decode_rows.append(
            [label, f"{size[0]}x{size[1]}", ms(p50(times)), ms(percentile(times, 95)), ratio(p50(full), p50(times))]
        )
    print()
    print(f"4000x3000 JPEG (quality 90, {len(data) / 1024:.0f} KiB, the whole file read), decoded + preprocessed")
    print(table(["decode", "decoded size", "p50", "p95", "full/this"], decode_rows))

    if args.baseline and registry.resolve(args.baseline) != registry.resolve(args.model):
        compare_entries(args.model, args.baseline, images, args.threads, r)


def compare_entries(model: str, baseline: str, images: list[Image.Image], threads: int, repeats: int) -> None:
    """One-image latency of two entries, each on the backend ``auto`` serves, taking turns call by call."""
    served = {name: Predictor.load(name, device="cpu", threads=threads, batch_size=32) for name in (model, baseline)}
    ids = {name: p.info.model_id for name, p in served.items()}
    times = interleaved(
        {ids[name]: (lambda p=p: p.predict([images[0]])) for name, p in served.items()}
        | {f"{ids[name]} + heat map": (lambda p=p: classify_and_cam(p, images[0])) for name, p in served.items()},
        repeats,
    )
    rows = []
    for label, values in times.items():
        rows.append([label, ms(p50(values)), ms(percentile(values, 95))])
    new, old = ids[model], ids[baseline]
    print()
    print(f"{new} against {old}, each on its default backend ({served[model].info.backend}, "
          f"{served[baseline].info.backend}); one fixture image, preprocessing included")  # fmt: skip
    print(table(["entry", "p50", "p95"], rows))
    print(
        f"one image p50 {new}/{old}: {ratio(p50(times[new]), p50(times[old]))}; with the heat map: "
        f"{ratio(p50(times[f'{new} + heat map']), p50(times[f'{old} + heat map']))} (below 1.00x: faster)"
    )


if __name__ == "__main__":
    main()
