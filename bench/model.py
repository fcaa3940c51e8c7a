"""Model benchmark: dermq's predictor against the naive way, in one process.

    python -m bench.model [--model ml/registry/<id>] [--device auto] [--repeats 50]

dermq's way: inference mode, channels-last, batched, one-pass Grad-CAM where the head allows it.
The naive way (the prototype's): contiguous float32 NCHW, one image at a time, autograd left on,
Grad-CAM through a backward pass. Prints load time (with the SHA-256 check), single-image latency
p50/p95, throughput at batch 8 and 32, and classification + heat map latency, with ratios.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
from PIL import Image

from bench.common import FIXTURE_IMAGES, ms, p50, percentile, table, timed
from ml import preprocess, registry
from ml.gradcam import GradCAM
from ml.predictor import Predictor

DEFAULT_MODEL = "effnet-lite0-ham10000-v1"


def naive_single(predictor: Predictor, model: torch.nn.Module, image: Image.Image) -> np.ndarray:
    batch = preprocess.batch_nhwc([image], predictor.prep)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(predictor.device)
    return model(x).detach().cpu().numpy()


def naive_gradcam(predictor: Predictor, model: torch.nn.Module, image: Image.Image) -> np.ndarray:
    batch = preprocess.batch_nhwc([image], predictor.prep)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(predictor.device)
    cam, _ = GradCAM(model)(x)
    return cam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)

    images = [Image.open(p).convert("RGB") for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))]
    load_times = timed(lambda: Predictor.load(args.model, device=args.device), repeats=5, warmup=1)
    predictor = Predictor.load(args.model, device=args.device, batch_size=32)
    device = predictor.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    naive = type(predictor.model)  # same weights, contiguous layout, autograd on
    naive_model = Predictor.load(args.model, device=args.device).model.to(memory_format=torch.contiguous_format)
    naive_model.requires_grad_(True)
    assert isinstance(naive_model, naive)

    def ours_batch(n: int) -> None:
        predictor.predict([images[i % len(images)] for i in range(n)])
        sync()

    def naive_batch(n: int) -> None:
        for i in range(n):
            naive_single(predictor, naive_model, images[i % len(images)])
        sync()

    r = args.repeats
    single = timed(lambda: ours_batch(1), r)
    single_naive = timed(lambda: naive_batch(1), r)
    b8 = timed(lambda: ours_batch(8), max(5, r // 5))
    b8_naive = timed(lambda: naive_batch(8), max(3, r // 10))
    b32 = timed(lambda: ours_batch(32), max(5, r // 5))
    b32_naive = timed(lambda: naive_batch(32), max(3, r // 10))
    cam = timed(lambda: predictor.analyze(images[0]), r)
    cam_naive = timed(
        lambda: (naive_single(predictor, naive_model, images[0]), naive_gradcam(predictor, naive_model, images[0])), r
    )

    rows = [
        ["load (SHA-256 + build)", ms(p50(load_times)), "", ""],
        ["one image p50", ms(p50(single)), ms(p50(single_naive)), f"{p50(single_naive) / p50(single):.2f}x"],
        [
            "one image p95",
            ms(percentile(single, 95)),
            ms(percentile(single_naive, 95)),
            f"{percentile(single_naive, 95) / percentile(single, 95):.2f}x",
        ],
        ["batch of 8 (p50)", ms(p50(b8)), ms(p50(b8_naive)), f"{p50(b8_naive) / p50(b8):.2f}x"],
        ["  throughput", f"{8 / p50(b8):.0f} img/s", f"{8 / p50(b8_naive):.0f} img/s", ""],
        ["batch of 32 (p50)", ms(p50(b32)), ms(p50(b32_naive)), f"{p50(b32_naive) / p50(b32):.2f}x"],
        ["  throughput", f"{32 / p50(b32):.0f} img/s", f"{32 / p50(b32_naive):.0f} img/s", ""],
        ["classify + heat map p50", ms(p50(cam)), ms(p50(cam_naive)), f"{p50(cam_naive) / p50(cam):.2f}x"],
        [
            "classify + heat map p95",
            ms(percentile(cam, 95)),
            ms(percentile(cam_naive, 95)),
            f"{percentile(cam_naive, 95) / percentile(cam, 95):.2f}x",
        ],
    ]
    manifest = registry.read_manifest(args.model)
    print(
        f"model {manifest['model_id']} ({manifest['architecture']}, input {manifest['preprocessing']['input_size']}, "
        f"tta {manifest.get('tta', 'none')}); device {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("images: the 300x225 fixture JPEGs, preprocessing included; heat map = Grad-CAM array + PNG overlay")
    print(table(["measure", "dermq", "naive", "naive/dermq"], rows))


if __name__ == "__main__":
    main()
