"""Worker layout benchmark: processes x threads per process on this machine's cores.

    python -m bench.layout [--seconds 20] [--backend auto]

Each layout runs ``processes`` independent predictors (as Celery prefork children would), each with
``threads`` intra-op threads, classifying and explaining the fixture images as fast as it can for a
fixed time. Prints images per second per layout, and the ratio to one process with all cores, in
one run. Set the winner with DERMQ_WORKER_CONCURRENCY (processes) and DERMQ_WORKER_THREADS.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from bench.common import FIXTURE_IMAGES, table
from ml import registry


def _run(model: str, backend: str, threads: int, seconds: float, start: float, out: mp.Queue) -> None:
    from ml.images import decode
    from ml.predictor import Predictor
    from worker.runtime import pin_threads

    pin_threads(threads)  # as a worker child: torch's threads, and NumPy's BLAS on one
    predictor = Predictor.load(model, device="cpu", backend=backend, threads=threads)
    images = [decode(p.read_bytes(), reduce_to=1024).image for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))]
    for image in images[:3]:
        predictor.explain(image, predictor.classify([image])[0])
    while time.time() < start:
        time.sleep(0.01)
    done, ends = 0, start + seconds
    while time.time() < ends:
        image = images[done % len(images)]
        predictor.explain(image, predictor.classify([image])[0])
        done += 1
    out.put(done)


def measure(model: str, backend: str, processes: int, threads: int, seconds: float) -> float:
    context = mp.get_context("spawn")
    queue: mp.Queue = context.Queue()
    start = time.time() + 15  # every process loaded and warm before the clock starts
    workers = [
        context.Process(target=_run, args=(model, backend, threads, seconds, start, queue)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = sum(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"])
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    layouts = sorted(
        {(1, cores), (cores, 1), (1, 1), *((p, cores // p) for p in range(1, cores + 1) if cores % p == 0), (cores, 2)}
    )
    rows, baseline = [], None
    for processes, threads in layouts:
        rate = measure(args.model, args.backend, processes, threads, args.seconds)
        baseline = rate if (processes, threads) == (1, cores) else baseline
        rows.append((processes, threads, rate))
    best = max(rows, key=lambda r: r[2])
    print(
        f"worker layouts on {cores} cores, backend {args.backend}, classification + heat map per image, "
        f"{args.seconds:.0f} s each"
    )
    print(
        table(
            ["processes", "threads each", "images/s", f"vs 1 x {cores}"],
            [[p, t, f"{r:.1f}", f"{r / baseline:.2f}x" if baseline else ""] for p, t, r in rows],
        )
    )
    print(f"best: DERMQ_WORKER_CONCURRENCY={best[0]} DERMQ_WORKER_THREADS={best[1]}")


if __name__ == "__main__":
    main()
