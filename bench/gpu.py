"""GPU benchmark: one prepared run that prints one table, on a machine with an NVIDIA GPU or without.

    python -m bench.gpu [--quick] [--cases 64] [--database dermq_bench_gpu] [--redis-url redis://127.0.0.1:6379/13]

- torch throughput of the shipped model (:data:`ml.registry.DEFAULT_MODEL`), loaded as a worker
  loads it (``Predictor.load(..., backend="torch")``, float32: the precision every device serves,
  see :mod:`ml.backends`), ``Predictor.classify`` on batches of 1/8/32/128 fixture images after a
  warm-up: images/s and p50 per batch; then a worker's model work for one case (classify, then
  draw the heat map);
- on a GPU, its answers against the CPU's for the same model and fixture images (labels that
  agree, the largest probability difference);
- ONNX Runtime with ``CUDAExecutionProvider`` over the entry's verified ``model.onnx`` at the same
  batch sizes, when onnxruntime-gpu is installed (else the row says it is not available);
- a real out-of-memory fallback: the GPU is filled until ``torch.OutOfMemoryError``, then the
  worker's own ``_classify_image`` classifies a case; the row shows the device that answered (the
  CPU predictor of :func:`worker.runtime.get_cpu_predictor`), and the memory is freed afterwards;
- the pipeline: a real API and Celery worker (``DERMQ_DEVICE=cuda``, or ``cpu`` without a GPU) on a
  scratch database, ``--cases`` cases submitted at once: submit-to-result p50/p95 and cases/s; on a
  GPU again with two worker children sharing it (what docker-compose.yml and deploy/k8s run).

Without a GPU the first line says so and everything runs on the CPU (batch 128 left out);
``--quick`` keeps such a run under about a minute.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import FIXTURE_IMAGES, ms, p50, percentile, rate_after, stack_layout, table, timed
from tests import processes, support

DATABASE = "dermq_bench_gpu"
REDIS_URL = "redis://127.0.0.1:6379/13"
GPU_BATCHES = (1, 8, 32, 128)
CPU_BATCHES = (1, 8, 32)


def fixture_images(count: int) -> list[Any]:
    """``count`` decoded fixture images (cycled), as PIL images."""
    from PIL import Image

    paths = sorted(FIXTURE_IMAGES.glob("*.jpg"))
    loaded = [Image.open(p).convert("RGB") for p in paths]
    return [loaded[i % len(loaded)] for i in range(count)]


def throughput_row(label: str, batch: int, seconds: list[float]) -> list[str]:
    return [label, str(batch), f"{batch / p50(seconds):.1f} images/s", ms(p50(seconds))]


def torch_rows(predictor: Any, batches: Sequence[int], repeats: int) -> list[list[str]]:
    label = f"torch {predictor.device.type} {getattr(predictor.backend, 'precision', 'fp32')}"
    rows = []
    for batch in batches:
        images = fixture_images(batch)
        rows.append(throughput_row(label, batch, timed(functools.partial(predictor.classify, images), repeats)))
    return rows


def onnx_cuda_rows(predictor: Any, batches: Sequence[int], repeats: int) -> list[list[str]]:
    """ONNX Runtime on CUDA over the entry's verified graph, a bare pass over a ready tensor (the torch
    rows classify: preprocessing, the gate and the decision too); one 'not available' row without it."""
    import numpy as np
    import onnxruntime as ort

    from ml import registry
    from ml.backends import INPUT

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [["onnxruntime CUDA", "-", "not available (no CUDAExecutionProvider: onnxruntime-gpu)", "-"]]
    entry = registry.resolve(predictor.info.model_id)
    graph = registry.read_verified(entry, "onnx_fp32")
    # float32, as the torch rows run (ml.backends.float32_on_cuda): the CUDA provider's convolutions may
    # use TF32 unless told not to; a provider without that option runs as it does, and the row says so
    precision = "fp32"
    try:
        session = ort.InferenceSession(graph, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
    except Exception:  # an option this onnxruntime does not know
        session, precision = ort.InferenceSession(graph, providers=["CUDAExecutionProvider"]), "fp32, TF32 allowed"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return [["onnxruntime CUDA", "-", f"not available (session got {session.get_providers()})", "-"]]
    height, width = predictor.prep.input_size
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
        rows.append(
            throughput_row(
                f"onnxruntime CUDA {precision}, bare pass ({ort.__version__})",
                batch,
                timed(functools.partial(session.run, None, {INPUT: x}), repeats),
            )
        )
    return rows


def heat_map_row(predictor: Any, repeats: int) -> list[str]:
    """A worker's model work for one case on the predictor's device: classify it, draw its heat map."""
    image = fixture_images(1)[0]

    def case() -> None:
        predictor.explain(image, predictor.classify([image])[0])

    seconds = timed(case, repeats)
    return [
        f"torch {predictor.device.type} classify + heat map",
        "1",
        f"{1 / p50(seconds):.1f} cases/s",
        ms(p50(seconds)),
    ]


def agreement_row(predictor: Any, cpu: Any) -> list[str]:
    """The GPU's answers against the CPU's, same model and fixture images: labels that agree, and
    the largest difference in any class probability (float32 on both; kernels differ in rounding)."""
    images = fixture_images(len(list(FIXTURE_IMAGES.glob("*.jpg"))))
    on_device, on_cpu = predictor.predict(images), cpu.predict(images)
    pairs = list(zip(on_device, on_cpu, strict=True))
    agree = sum(a.label == b.label for a, b in pairs)
    gap = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in pairs for c in a.probabilities)
    return [
        f"{predictor.device.type} answers against the CPU's",
        str(len(images)),
        f"{agree}/{len(images)} labels agree; largest probability difference {gap:.1e}",
        "-",
    ]


def oom_fallback_row(settings: Any, predictor: Any) -> list[str]:
    """Fill the GPU until it refuses, classify through the worker's fallback path, free the memory."""
    import torch

    from worker import runtime
    from worker.pipeline import _classify_image

    hoard: list[torch.Tensor] = []
    chunk = 1 << 30
    while chunk >= 1 << 20:  # 1 GiB chunks, then smaller, down to 1 MiB: the GPU left full
        try:
            hoard.append(torch.empty(chunk, dtype=torch.uint8, device=predictor.device))
        except torch.OutOfMemoryError:
            chunk //= 4
    held = sum(t.numel() for t in hoard) / 2**30
    try:
        torch.zeros(1 << 22, device=predictor.device)  # proof that the device is full
        provoked = "no OOM provoked"
    except torch.OutOfMemoryError:
        provoked = f"OOM at {held:.1f} GiB held"
    image = fixture_images(1)
    started = time.perf_counter()
    try:
        classified = _classify_image(settings, predictor, image[0], attempt=1)
    finally:
        hoard.clear()
        runtime.free_device_memory(predictor)
    took = time.perf_counter() - started
    after = torch.cuda.memory_allocated(predictor.device) / 2**30
    answered = str(classified.predictor.device)
    return [
        "OOM fallback (worker _classify_image)",
        "1",
        f"{provoked}; answered on {answered} ({classified.analysis.prediction.label}); {after:.2f} GiB left allocated",
        ms(took),
    ]


def pipeline_row(env: dict[str, str], workdir: Path, token: str, cases: int) -> list[str]:
    """Submit ``cases`` cases at once to a real API + worker (its device and children as ``env`` sets
    them); submit-to-result p50/p95 and cases/s."""
    import httpx

    device, children = env["DERMQ_DEVICE"], int(env["DERMQ_WORKER_CONCURRENCY"])

    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    data = [p.read_bytes() for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))]
    api = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, workdir / "api.log")
    worker = None
    try:
        support.wait_for(lambda: processes.api_up(base) or not api.alive(), timeout=60, what="the API")
        if not api.alive():
            raise RuntimeError(api.output()[-2000:])
        worker = processes.start_worker(env, workdir / "worker.log", concurrency=children)
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        submitted: dict[str, float] = {}
        for i in range(cases):
            started = time.perf_counter()
            response = http.post("/v1/cases", files={"image": ("b.jpg", data[i % len(data)], "image/jpeg")})
            response.raise_for_status()
            submitted[str(response.json()["id"])] = started
        first = min(submitted.values())
        latencies: list[float] = []
        failed = 0
        pending = dict(submitted)
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            for case_id in list(pending):
                status = http.get(f"/v1/cases/{case_id}").json()["status"]
                if status in ("succeeded", "failed"):
                    latencies.append(time.perf_counter() - pending.pop(case_id))
                    failed += status == "failed"
            time.sleep(0.02)
        span = time.perf_counter() - first
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
    if pending:
        raise RuntimeError(f"{len(pending)} of {cases} cases unfinished after 600 s")
    steady = flowing_rate(env, list(submitted))
    # every case of one batch ends in the same transaction: no span to divide by
    flowing = f"{steady:.1f} from the first result on" if steady == steady else "all ended at once, in one batch"
    return [
        f"pipeline DERMQ_DEVICE={device}{'' if children == 1 else f', {children} children'} "
        f"({cases} cases at once, {failed} failed)",
        "-",
        f"{len(latencies) / span:.1f} cases/s ({flowing}); p95 {ms(percentile(latencies, 95))}",
        ms(p50(latencies)),
    ]


def flowing_rate(env: dict[str, str], case_ids: list[str]) -> float:
    """Cases per second once results flow, without the submissions and the first batch's wait: from
    the first case's end to the last's, as the database recorded them (the client's polls would only
    see them to within a sweep over every case still pending)."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Case

    with session_scope(support.settings_for(env)) as session:
        ids = [uuid.UUID(i) for i in case_ids]
        ended = sorted(at for at in session.scalars(select(Case.finished_at).where(Case.id.in_(ids))) if at is not None)
    return rate_after(ended, ended[0]) if ended else float("nan")


def guarded(label: str, measure: Callable[[], list[list[str]]]) -> list[list[str]]:
    """The rows of ``measure``, or one row naming what went wrong: one failed measure (a CUDA library
    that does not load, an error other than OutOfMemoryError) must not cost the rest of the table."""
    try:
        return measure()
    except Exception as exc:
        message = " ".join(str(exc).split())  # one line: the table stays a table
        return [[label, "-", f"failed: {type(exc).__name__}: {message[:200]}", "-"]]


def model_rows(settings: Any, device: str, repeats: int) -> list[list[str]]:
    """The throughput and OOM rows, with the model loaded here as a worker child loads it (and let go
    on return, before the pipeline's worker loads its own)."""
    from ml.backends import float32_on_cuda
    from ml.predictor import Predictor
    from ml.registry import DEFAULT_MODEL
    from worker.runtime import pin_threads, threads_per_child

    gpu = device == "cuda"
    threads = threads_per_child(settings)  # as a worker child sets them, NumPy's BLAS on one
    pin_threads(threads)
    float32_on_cuda()  # as a worker child on a GPU: float32 convolutions, not TF32
    predictor = Predictor.load(
        DEFAULT_MODEL, device=device, backend="torch", threads=threads, overlay_max_side=settings.overlay_max_side
    )
    batches = GPU_BATCHES if gpu else CPU_BATCHES
    rows = [*torch_rows(predictor, batches, repeats), heat_map_row(predictor, repeats)]
    if not gpu:
        return [
            *rows,
            ["cuda answers against the CPU's", "-", "skipped: no GPU", "-"],
            ["onnxruntime CUDA", "-", "not available (no GPU)", "-"],
            ["OOM fallback", "-", "skipped: no GPU", "-"],
        ]
    cpu = functools.partial(Predictor.load, DEFAULT_MODEL, device="cpu", backend="torch", threads=threads)
    rows += guarded("cuda answers against the CPU's", lambda: [agreement_row(predictor, cpu())])
    rows += guarded("onnxruntime CUDA", lambda: onnx_cuda_rows(predictor, batches, repeats))
    return rows + guarded("OOM fallback", lambda: [oom_fallback_row(settings, predictor)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (a CPU run in about a minute)")
    parser.add_argument("--cases", type=int, default=None, help="pipeline cases (default 64, 8 with --quick)")
    parser.add_argument("--database", default=DATABASE, help="scratch database for the pipeline (recreated)")
    parser.add_argument("--redis-url", default=REDIS_URL, help="Redis database for the pipeline (flushed)")
    args = parser.parse_args(argv)

    import torch

    from ml.registry import DEFAULT_MODEL

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu:
        print(
            f"dermq GPU benchmark on {torch.cuda.get_device_name(0)}, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    else:
        print(f"no GPU: CUDA is not available here; running on the CPU ({os.cpu_count()} CPUs) instead")
    repeats = 5 if args.quick else 20
    cases = args.cases or (8 if args.quick else 64)

    workdir = Path(tempfile.mkdtemp(prefix="dermq-bench-gpu-"))
    env = support.test_env(
        workdir,
        DERMQ_DATABASE_URL=f"postgresql+psycopg2:///{args.database}",
        DERMQ_REDIS_URL=args.redis_url,
        DERMQ_API_PORT=str(support.free_port()),
        DERMQ_LOG_LEVEL="INFO",  # the worker's "ready." and "model loaded" lines
        DERMQ_API_PROCESSES="1",
        DERMQ_WORKER_CONCURRENCY="1",
        DERMQ_DEVICE=device,
        DERMQ_MODEL=DEFAULT_MODEL,
    )
    print(f"pipeline layout: {stack_layout(env)}, DERMQ_DEVICE={device}")
    # the model's rows first, needing neither Postgres nor Redis: a GPU host without them still gets them
    settings = support.settings_for(env)
    rows = model_rows(settings, device, repeats)
    if gpu:
        torch.cuda.empty_cache()  # the measured predictor is gone; the pipeline's worker loads its own

    def pipeline(children: int) -> list[list[str]]:
        layout = {**env, "DERMQ_WORKER_CONCURRENCY": str(children)}
        _, _, token = support.prepare_stack(layout, f"bench-gpu-{uuid.uuid4().hex[:6]}")
        return [pipeline_row(layout, workdir, token, cases)]

    rows += guarded("pipeline", lambda: pipeline(1))
    if gpu:  # two children sharing the GPU, as docker-compose.yml and deploy/k8s run a GPU worker
        rows += guarded("pipeline, 2 children", lambda: pipeline(2))
    print(table(["measure", "batch", "throughput", "p50 per batch"], rows))


if __name__ == "__main__":
    main()
