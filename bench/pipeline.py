"""Pipeline benchmark: submit-to-result latency and backlog throughput of the real stack, against the
raw Predictor on the same images in the same run.

    python -m bench.pipeline [--idle 40] [--backlog 200] [--concurrency 1]

Starts its own API (uvicorn) and Celery worker processes on a scratch database (``dermq_bench``)
and Redis database 12, as `make run` would. Measures:

- idle latency: one case at a time, from the start of the POST until a GET shows ``succeeded``
  (polling every 5 ms), Grad-CAM included; then as one request per case (``POST ?wait=20``, answered
  201 with the result), the way the Python client and the portal submit;
- backlog throughput: ``--backlog`` cases queued while no worker runs, then a worker drains them,
  twice: one case per transaction (``DERMQ_BATCHING=off``) and in dynamic batches (the default);
  cases per second between finishes, the first 10% left out (worker start-up excluded), and the CPU
  each case cost the worker (its main process and children), Postgres (the backends serving the
  benchmark's database) and the API (idle meanwhile) over the same cases: where the time the raw
  predictor does not spend goes;
- raw: ``Predictor.classify`` then ``Predictor.explain`` (classification + heat map PNG) on the
  same decoded images, in this process, one image at a time, with the same thread count as one
  worker child.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import func, select, text

from bench.common import FIXTURE_IMAGES, camera_jpegs, image_sizes, ms, p50, percentile, rate_after, stack_layout, table
from bench.machine import cpu_by_role, processor
from tests import processes, support

DATABASE = "dermq_bench"
#: the fraction of a backlog's first finishes left out of its throughput (worker start-up)
WARM_UP = 0.1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=40, help="sequential cases for the idle latency")
    parser.add_argument("--backlog", type=int, default=200, help="cases queued before the worker starts")
    parser.add_argument("--api-processes", type=int, default=1, help="API processes")
    parser.add_argument("--concurrency", type=int, default=1, help="worker child processes")
    parser.add_argument("--images", default=str(FIXTURE_IMAGES), help="folder of JPEGs to submit")
    parser.add_argument("--camera", action="store_true", help="submit 12-megapixel JPEGs (4000x3000) instead")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dermq-bench-"))
    port = support.free_port()
    env = support.test_env(
        workdir,
        DERMQ_DATABASE_URL=f"postgresql+psycopg2:///{DATABASE}",
        DERMQ_REDIS_URL="redis://127.0.0.1:6379/12",
        DERMQ_API_PORT=str(port),
        DERMQ_LOG_LEVEL="INFO",  # the worker's "ready." and "model loaded" lines, which start_worker waits for
        DERMQ_API_PROCESSES=str(args.api_processes),
        DERMQ_WORKER_CONCURRENCY=str(args.concurrency),
    )
    settings, _, token = support.prepare_stack(env, f"bench-{uuid.uuid4().hex[:6]}")
    headers = {"Authorization": f"Bearer {token}"}
    images = camera_jpegs() if args.camera else [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    base = f"http://127.0.0.1:{port}"

    api = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, workdir / "api.log")
    worker = None
    try:
        support.wait_for(lambda: processes.api_up(base), timeout=60, what="the API")
        worker = processes.start_worker(env, workdir / "worker.log", concurrency=args.concurrency)
        http = httpx.Client(base_url=base, headers=headers, timeout=30)

        def submit(data: bytes) -> str:
            response = http.post("/v1/cases", files={"image": ("b.jpg", data, "image/jpeg")})
            response.raise_for_status()
            return str(response.json()["id"])

        def until_done(case_id: str) -> None:
            while http.get(f"/v1/cases/{case_id}").json()["status"] not in ("succeeded", "failed"):
                time.sleep(0.005)

        for data in images[:3]:  # warm-up: model load in the child, connection pools
            until_done(submit(data))
        latencies, intake, waited = [], [], []
        for i in range(args.idle):
            started = time.perf_counter()
            case_id = submit(images[i % len(images)])
            intake.append(time.perf_counter() - started)
            until_done(case_id)
            latencies.append(time.perf_counter() - started)
        for i in range(args.idle):  # one request per case, as the client library and the portal ask
            started = time.perf_counter()
            answer = http.post("/v1/cases?wait=20", files={"image": ("b.jpg", images[i % len(images)], "image/jpeg")})
            if answer.status_code != 201:
                raise RuntimeError(f"POST ?wait=20 answered {answer.status_code}: {answer.text[:200]}")
            waited.append(time.perf_counter() - started)

        rates: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}
        failed = 0
        for mode in ("off", "on"):  # one case per transaction, then dynamic batches (the CPU default)
            worker.stop()
            worker = None
            backlog_ids = [submit(images[i % len(images)]) for i in range(args.backlog)]
            worker = processes.start_worker(
                env | {"DERMQ_BATCHING": mode}, workdir / f"worker-{mode}.log", concurrency=args.concurrency
            )
            rate, mode_failed, per_case = drain_rate(
                settings, backlog_ids, {"api": api.proc.pid, "worker": worker.proc.pid}
            )
            rates[mode] = rate
            cpu[mode] = per_case
            failed += mode_failed
    finally:
        if worker is not None:
            worker.stop()
        api.stop()

    raw_rate, raw_one = raw_predictor(settings, images, args.concurrency)
    rows = [
        ["idle submit-to-result p50 (POST, then GET every 5 ms)", ms(p50(latencies))],
        ["idle submit-to-result p95 (POST, then GET every 5 ms)", ms(percentile(latencies, 95))],
        ["idle submit-to-result p50 (one POST ?wait=20)", ms(p50(waited))],
        ["idle submit-to-result p95 (one POST ?wait=20)", ms(percentile(waited, 95))],
        ["intake (POST answered) p50", ms(p50(intake))],
        [f"backlog of {args.backlog}, one case per transaction", f"{rates['off']:.1f} cases/s"],
        [f"backlog of {args.backlog}, dynamic batches (default)", f"{rates['on']:.1f} cases/s"],
        ["batches / one at a time", f"{rates['on'] / rates['off']:.2f}x"],
        ["failed cases (both backlogs)", str(failed)],
        *[
            [f"CPU per case, {label} (after the first {WARM_UP:.0%})", _cpu_row(cpu[mode])]
            for mode, label in (("off", "one per transaction"), ("on", "dynamic batches"))
        ],
        ["raw Predictor.classify + explain throughput", f"{raw_rate:.1f} images/s ({ms(raw_one)} each)"],
        ["pipeline (default) / raw", f"{rates['on'] / raw_rate:.0%}"],
        ["pipeline (one at a time) / raw", f"{rates['off'] / raw_rate:.0%}"],
    ]
    print(
        f"dermq pipeline benchmark: {stack_layout(env)}, "
        f"{len(images)} distinct images ({image_sizes(images)} JPEG), Grad-CAM on; {processor()}"
    )
    print(table(["measure", "value"], rows))


def _cpu_row(per_case: dict[str, float]) -> str:
    """A drain's CPU per case by process, and their sum: ``worker 10.9 + postgres 0.8 + api 0.0 = 11.7 ms``."""
    if not per_case:
        return "n/a (drained before its first cases had finished)"
    parts = " + ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in per_case.items())
    return f"{parts} = {sum(per_case.values()) * 1000:.1f} ms"


def drain_rate(settings: object, backlog_ids: list[str], roles: dict[str, int]) -> tuple[float, int, dict[str, float]]:
    """Cases per second while a worker drains ``backlog_ids``, how many failed, and the CPU each
    process tree of ``roles`` (and the database's Postgres backends) spent per case meanwhile.

    Counted after the first ``WARM_UP`` fraction of the cases finished: the children load their
    models in the background after the fork, and a case claimed meanwhile waits for that load, which
    is start-up, not throughput. The CPU is read when that many have finished and when all have, and
    divided by the cases that finished between."""
    from core.db import session_scope
    from core.models import Case

    ids = [uuid.UUID(i) for i in backlog_ids]
    skip = max(1, int(len(ids) * WARM_UP))
    ended = select(func.count()).select_from(Case).where(Case.id.in_(ids), Case.status.in_(["succeeded", "failed"]))
    with session_scope(settings) as session:  # type: ignore[arg-type]
        # this count's own backend is the benchmark's, not the pipeline's
        besides = frozenset({int(session.scalar(text("SELECT pg_backend_pid()")) or 0)})
        deadline = time.monotonic() + 1800
        cpu_from: dict[str, float] = {}
        counted_from = 0
        while (done := int(session.scalar(ended) or 0)) < len(ids):
            if not cpu_from and done >= skip:
                cpu_from, counted_from = cpu_by_role(roles, database=DATABASE, besides=besides), done
            if time.monotonic() > deadline:
                raise TimeoutError(f"the backlog did not drain: {done} of {len(ids)} cases ended")
            time.sleep(0.2)  # each count sees the cases as they are now (read committed): one backend
        cpu_to = cpu_by_role(roles, database=DATABASE, besides=besides)
        finished = sorted(
            at for at in session.scalars(select(Case.finished_at).where(Case.id.in_(ids))) if at is not None
        )
        failed = session.scalar(select(func.count()).select_from(Case).where(Case.id.in_(ids), Case.status == "failed"))
    cases = len(ids) - counted_from
    per_case = {
        name: (cpu_to[name] - cpu_from[name]) / cases
        for name in (*roles, "postgres")
        if cpu_from and cases > 0 and name in cpu_to
    }
    return rate_after(finished, finished[skip]), int(failed or 0), per_case


def _raw_worker(
    model: str, device: str, backend: str, overlay: int, images: list[bytes], threads: int, n: int
) -> float:
    """Seconds per image for classification + heat map, decoded as the worker decodes, on the threads a
    worker child has (ONNX Runtime's included: its default of two each oversubscribed the cores)."""
    from ml.images import decode
    from ml.predictor import Predictor
    from worker.runtime import pin_threads

    pin_threads(threads)  # as a worker child: torch's threads, and NumPy's BLAS on one
    predictor = Predictor.load(model, device=device, backend=backend, threads=threads, overlay_max_side=overlay)
    for data in images[:3]:
        image = decode(data, reduce_to=overlay).image
        predictor.explain(image, predictor.classify([image])[0])
    started = time.perf_counter()
    for i in range(n):
        image = decode(images[i % len(images)], reduce_to=overlay).image
        predictor.explain(image, predictor.classify([image])[0])
    return (time.perf_counter() - started) / n


def raw_predictor(settings: object, images: list[bytes], concurrency: int) -> tuple[float, float]:
    """Images per second of the raw Predictor in ``concurrency`` processes (as many as worker children),
    each with the thread count a worker child gets."""
    from concurrent.futures import ProcessPoolExecutor

    from worker.runtime import threads_per_child

    # the worker's own rule for its children's threads, at the benchmark's concurrency
    threads = threads_per_child(settings.model_copy(update={"worker_concurrency": concurrency}))  # type: ignore[attr-defined]
    job = (settings.model, settings.device, settings.backend, settings.overlay_max_side, images, threads, 150)  # type: ignore[attr-defined]
    if concurrency == 1:
        seconds = [_raw_worker(*job)]
    else:
        with ProcessPoolExecutor(concurrency) as pool:
            seconds = list(pool.map(_raw_worker, *zip(*[job] * concurrency, strict=True)))
    return sum(1 / s for s in seconds), sum(seconds) / len(seconds)


if __name__ == "__main__":
    main()
