"""Served-path benchmark: what dermq's predictor adds to the raw graph, on the same threads.

    python -m bench.served [--model ml/registry/<id>] [--threads 1] [--repeats 200]

The baseline is a bare forward pass of the graph the predictor serves: ONNX Runtime's
``session.run`` on a tensor already decoded, resized, normalised and laid out as the graph wants,
asking for the outputs the path it is compared with asks for (``predict``: the logits and, for the
out-of-distribution gate, the pooled features, or the feature map where the graph has no pooled
output; classification: the feature map too, for the heat map). Against it, in the same
process and taking turns call by call (a busy machine slows them alike: read the ratios):

- ``Predictor.predict``: resizing and normalising the decoded image, the pass, calibration, the
  decision rule and the out-of-distribution gate: what a label costs;
- ``classify + heat map``: what a worker runs for a case, the pass kept for a class activation map and
  the overlay PNG drawn on the image (a 300x225 fixture: its own size).

Issue 16's targets: predict at most 1.2x and classify + heat map at most 1.4x the bare pass. The
images are the fixture lesions (tests/fixtures/images, 300x225), decoded once beforehand. One thread
by default: what one worker child on this 2-core machine gets (DERMQ_WORKER_THREADS).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench.common import FIXTURE_IMAGES, interleaved, ms, p50, percentile, table
from bench.machine import processor
from ml import preprocess, registry
from ml.backends import INPUT, OnnxBackend
from ml.predictor import Predictor
from worker.runtime import pin_threads

TARGETS = {"Predictor.predict": 1.2, "classify + heat map": 1.4}


def baselines(predict_outputs: list[str], classify_outputs: list[str]) -> dict[str, str]:
    """Each row's baseline: the bare pass asking for the outputs its path asks for (one row where the
    two paths ask for the same, as for a graph without the pooled output)."""
    bare_predict = f"bare pass: {', '.join(predict_outputs)}"
    bare_classify = f"bare pass: {', '.join(classify_outputs)}"
    return {
        bare_predict: bare_predict,
        bare_classify: bare_classify,
        "Predictor.predict": bare_predict,
        "classify + heat map": bare_classify,
    }


def each_image(run: Callable[[int], None], count: int) -> Callable[[], None]:
    """``run`` on the next of ``count`` images at each call: every contender goes through all of
    them in turn, however many contenders take turns (a counter shared by three contenders over nine
    images gave each a third of them)."""
    turn = [-1]

    def call() -> None:
        turn[0] = (turn[0] + 1) % count
        run(turn[0])

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(registry.REGISTRY_DIR / registry.DEFAULT_MODEL))
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, for every contender")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)

    # the threads a worker child runs on: torch's its budget (the resampler of entries that name
    # PyTorch's, ml.preprocess), NumPy's products one
    pin_threads(args.threads)
    predictor = Predictor.load(args.model, device="cpu", threads=args.threads)
    if not isinstance(predictor.backend, OnnxBackend):
        raise SystemExit(f"{args.model} serves {predictor.backend.name}; this compares against an ONNX graph")
    backend = predictor.backend
    session = backend.session
    # what each path asks ONNX Runtime for (Predictor.predict and Predictor.classify)
    gated = predictor.gate is not None
    predict_outputs = backend.output_names(pooled=gated)
    classify_outputs = backend.output_names(features=predictor.cam_weight is not None, pooled=gated)
    images = [Image.open(path).convert("RGB") for path in sorted(FIXTURE_IMAGES.glob("*.jpg"))]
    tensors = [
        np.ascontiguousarray(preprocess.batch_nhwc([image], predictor.prep).transpose(0, 3, 1, 2)) for image in images
    ]

    def bare(outputs: list[str]) -> Callable[[int], None]:
        return lambda i: session.run(outputs, {INPUT: tensors[i]})

    def predict(i: int) -> None:
        predictor.predict([images[i]])

    def classify_and_heat_map(i: int) -> None:
        predictor.explain(images[i], predictor.classify([images[i]])[0])

    baseline = baselines(predict_outputs, classify_outputs)
    runs = {
        baseline["Predictor.predict"]: bare(predict_outputs),
        baseline["classify + heat map"]: bare(classify_outputs),
    }
    runs |= {"Predictor.predict": predict, "classify + heat map": classify_and_heat_map}
    times = interleaved(
        {name: each_image(run, len(images)) for name, run in runs.items()}, repeats=args.repeats, warmup=10
    )
    rows = []
    for name, values in times.items():
        ratio = p50(values) / p50(times[baseline[name]])
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'not met'}"
        rows.append([name, ms(p50(values)), ms(percentile(values, 95)), f"{ratio:.2f}x", verdict])
    print(
        f"served path against the raw graph: {predictor.info.model_id} on {predictor.backend.name}, "
        f"{args.threads} thread(s), {len(images)} fixture images, {args.repeats} turns, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs ({processor()})"
    )
    print(table(["path", "p50", "p95", "/ its bare pass p50", "target"], rows))


if __name__ == "__main__":
    main()
