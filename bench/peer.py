"""Peer benchmark: dermq against BentoML serving the same ``model.onnx``, with the same client (issue 16).

    python -m bench.peer [--seconds 30] [--rounds 1] [--clients 32] [--idle 100] [--setup-only]

The peer is what a user would pick instead: BentoML (:mod:`bench.peer_service`) serving the
shipped entry's ``model.onnx`` on ONNX Runtime with adaptive batching, 2 workers x 1 thread, the
same decoding and preprocessing as dermq's worker (the same modules), answering the label and the
calibrated probabilities. BentoML lives in a virtual environment of its own, ``.venv-peer`` (made
with ``python -m venv`` and pip on the first run, reused afterwards; ``--setup-only`` stops there),
because it would move the project's pinned FastAPI and Starlette; it is a benchmark-only dependency.

dermq runs its own stack as ``python -m bench.load`` does (scratch database ``dermq_bench_peer``,
Redis database 9, flushed) in ``make run``'s layout on this machine: half the cores in API
processes, a worker with one prefork child per core and one thread each. Its client makes one
request per case: ``POST /v1/cases?wait=S`` (201 with the finished case), and ``GET
/v1/cases/{id}?wait=S`` while a case has not ended.

Both run at once and are measured by the same harness, interleaved. After an untimed warm-up of 4
clients: idle latency, one request at a time, taking turns request by request. After an untimed
warm-up at full load: ``--clients`` clients in a closed loop (each sends its next image when the
last is answered) for ``--seconds``, peer and dermq alternating (the order flips every round).
Images: 400 HAM10000 JPEGs (``../shared/data/ham10000/images``, sorted by name) when present, else
the fixture images.

Reported: idle p50/p95, completed/s, p50/p95 under load, errors, the ratios dermq/peer against issue
16's targets (idle p50 <= 2x the peer's, throughput >= 0.5x, no errors), each system's server CPU per
case completed under load (its processes and, for dermq, its Postgres backends; not the client's),
and ONNX Runtime alone on
batches of 8 in this process as the raw ceiling (measured before the runs and after each round,
both servers idle: median and range). The load average before the start and the CPU other processes
used while it ran say how much the figures can be trusted; the ratios are what to read. A round trip
to Redis before the runs, back to back and after 5 ms without one, says what waking a process costs
on this machine: an idle case meets that at each of its steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench.common import FIXTURE_IMAGES, ROOT, p50, timed
from bench.load_stack import start_stack
from bench.machine import OtherWork, cpu_by_role, processor, round_trips
from bench.peer_clients import DermqSession, LoadRun, PeerSession, Session, closed_loop, idle_latency
from bench.peer_report import Figures, comparison, cpu_per_case, images_per_second
from tests import processes, support

PEER_VENV = ROOT / ".venv-peer"
#: what pip resolved for the peer on the development machine (Python 3.11); onnxruntime, NumPy,
#: Pillow and PyTorch (the shipped entry's resampler, ml.preprocess) as in the project's environment,
#: so that only the serving layer differs
PEER_REQUIREMENTS = ("bentoml==1.4.40", "onnxruntime==1.32.0", "numpy==2.4.6", "pillow==13.0.0", "torch==2.14.1")
HAM10000_IMAGES = ROOT.parent / "shared" / "data" / "ham10000" / "images"
DATABASE = "dermq_bench_peer"
REDIS_DB = 9
#: a 1-minute load average above this many per core before the start means other work shares the cores
BUSY_LOAD_PER_CORE = 0.5


# ---------------------------------------------------------------- the peer's environment and process


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """The peer environment's ``bin`` folder, made (``python -m venv`` + pip) unless it already holds
    exactly :data:`PEER_REQUIREMENTS`."""
    stamp = venv / "dermq-peer-requirements.txt"
    wanted = "\n".join(PEER_REQUIREMENTS) + "\n"
    if (venv / "bin" / "bentoml").exists() and stamp.exists() and stamp.read_text() == wanted:
        return venv / "bin"
    print(f"setting up the peer's environment in {venv} (BentoML; a few minutes, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *PEER_REQUIREMENTS]
    installed = subprocess.run(pip, capture_output=True, text=True)
    if installed.returncode != 0:
        raise SystemExit(f"pip could not install the peer's requirements:\n{installed.stderr[-3000:]}")
    stamp.write_text(wanted)
    return venv / "bin"


def peer_versions(bin_dir: Path) -> dict[str, str]:
    script = "from importlib.metadata import version as v; print(v('bentoml'), v('onnxruntime'))"
    out = subprocess.run([str(bin_dir / "python"), "-c", script], check=True, capture_output=True, text=True)
    bentoml, onnxruntime = out.stdout.split()
    return {"bentoml": bentoml, "onnxruntime": onnxruntime}


@dataclass
class Peer:
    process: processes.Process
    base: str

    def stop(self) -> None:
        """SIGTERM to ``bentoml serve``, which stops its workers; any worker left over is killed."""
        workers = child_pids(self.process.proc.pid)
        self.process.stop()
        for pid in workers:
            try:
                if "peer_service" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def start_peer(bin_dir: Path, workdir: Path, args: argparse.Namespace) -> Peer:
    port = support.free_port()
    env = {
        "PYTHONPATH": str(ROOT),  # bench.peer_service and the ml modules it shares with dermq
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "DERMQ_PEER_MODEL": args.model,
        "DERMQ_PEER_WORKERS": str(args.peer_workers),
        "DERMQ_PEER_THREADS": "1",
        "DERMQ_PEER_MAX_BATCH": str(args.peer_max_batch),
        "DERMQ_PEER_MAX_LATENCY_MS": str(args.peer_max_latency_ms),
    }
    command = [str(bin_dir / "bentoml"), "serve", "bench.peer_service:PeerClassifier"]
    process = processes.Process("peer", [*command, "--host", "127.0.0.1", "--port", str(port)], env, workdir / "peer")
    peer = Peer(process, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        try:
            return httpx.get(f"{peer.base}/readyz", timeout=1).status_code == 200 or not process.alive()
        except httpx.HTTPError:
            return not process.alive()

    try:
        support.wait_for(ready, timeout=120, what="the BentoML peer")
        if not process.alive():
            raise RuntimeError(process.output()[-3000:])
    except BaseException:
        peer.stop()
        raise
    return peer


def onnx_ceiling(model: str, images: list[bytes], threads: int, repeats: int = 30) -> Callable[[], float]:
    """A measurement to repeat: images per second of ONNX Runtime alone on one preprocessed batch of 8
    (the model only, in this process, ``threads`` intra-op threads)."""
    from ml import backends, preprocess, registry
    from ml.images import decode
    from ml.model import Preprocessing

    prep = Preprocessing.from_dict(registry.read_manifest(model)["preprocessing"])
    session = backends.create_session(registry.read_verified(model, "onnx_fp32"), threads)
    batch = preprocess.batch_nhwc([decode(data, reduce_to=512).image for data in images[:8]], prep)
    x = batch.transpose(0, 3, 1, 2).copy()
    return lambda: len(x) / p50(timed(lambda: session.run(["logits"], {"input": x}), repeats, warmup=3))


def load_images(folder: str | None, count: int) -> tuple[list[bytes], str]:
    """``count`` JPEGs (first by name) and where they came from."""
    if folder:
        paths, source = sorted(Path(folder).glob("*.jpg"))[:count], folder
    elif HAM10000_IMAGES.is_dir():
        paths, source = sorted(HAM10000_IMAGES.glob("*.jpg"))[:count], f"HAM10000 ({HAM10000_IMAGES})"
    else:
        paths = sorted(FIXTURE_IMAGES.glob("*.jpg"))[:count]
        source = f"the fixture images (tests/fixtures/images; {HAM10000_IMAGES} is not here)"
    if not paths:
        raise SystemExit(f"no JPEGs in {source}")
    return [p.read_bytes() for p in paths], f"{len(paths)} JPEGs from {source}"


def dermq_layout() -> tuple[int, int, int]:
    """``make run``'s layout on this machine's CPU: API processes (half the usable cores, as
    core.devstack sets them), worker children (one per usable core, worker.runtime's auto) and threads each."""
    from core.cpus import usable_cpus
    from core.devstack import default_api_processes

    return default_api_processes(), usable_cpus(), 1


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30, help="length of each closed-loop run")
    parser.add_argument("--rounds", type=int, default=1, help="closed-loop runs of each system, alternating")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in the closed loop")
    parser.add_argument("--idle", type=int, default=100, help="idle requests to each system, taking turns")
    parser.add_argument(
        "--warmup-seconds", type=float, default=5, help="untimed closed loops before the idle and the loaded phase"
    )
    parser.add_argument("--wait", type=float, default=20, help="dermq's ?wait= seconds")
    parser.add_argument("--images", help="a folder of JPEGs instead of HAM10000 or the fixtures")
    parser.add_argument("--count", type=int, default=400, help="how many images to send, in turn")
    parser.add_argument("--model", default=None, help="registry entry both serve (default: ml.registry's default)")
    parser.add_argument("--peer-workers", type=int, default=2, help="BentoML worker processes (1 thread each)")
    parser.add_argument("--peer-max-batch", type=int, default=8, help="BentoML adaptive batching: largest batch")
    parser.add_argument(
        "--peer-max-latency-ms",
        type=int,
        default=60_000,
        help="BentoML adaptive batching: requests expected to wait longer are refused with 503 (BentoML's default)",
    )
    parser.add_argument("--setup-only", action="store_true", help="make the peer's environment and stop")
    args = parser.parse_args(argv)

    from ml import registry

    args.model = args.model or registry.DEFAULT_MODEL
    registry.resolve(args.model)  # a wrong name fails here, not in two servers
    load_at_start = os.getloadavg()
    bin_dir = ensure_peer_venv()
    if args.setup_only:
        print(f"the peer's environment is ready: {bin_dir.parent} ({', '.join(PEER_REQUIREMENTS)})")
        return
    versions = peer_versions(bin_dir)
    images, source = load_images(args.images, args.count)
    cores = os.cpu_count() or 1
    ceiling = onnx_ceiling(args.model, images, cores)
    ceilings = [ceiling()]  # and after every round: the machine's share for us changes as the runs do
    api_processes, children, threads = dermq_layout()

    workdir = Path(tempfile.mkdtemp(prefix="dermq-bench-peer-"))  # key file and logs
    launched: list[processes.Process] = []
    stopped = threading.Event()
    peer: Peer | None = None
    database_url, finished = None, False
    try:
        peer = start_peer(bin_dir, workdir, args)
        stack = argparse.Namespace(
            api_processes=api_processes, concurrency=children, worker_threads=threads, clients=args.clients
        )
        base, tokens, database_url, _ = start_stack(
            stack,
            workdir,
            launched,
            stopped,
            database=DATABASE,
            redis_db=REDIS_DB,
            DERMQ_DEVICE="cpu",  # the peer has no GPU path; on a GPU machine this still compares CPU with CPU
            DERMQ_MODEL=args.model,
        )
        peer_base = peer.base
        openers: dict[str, Callable[[int], Session]] = {
            "peer": lambda _: PeerSession(peer_base),
            "dermq": lambda n: DermqSession(base, tokens[n], args.wait),
        }

        warm_errors: dict[str, Counter[str]] = {name: Counter() for name in openers}

        def warm_up(clients: int) -> None:
            for name, opener in openers.items():
                warm = closed_loop(opener, images, clients, args.warmup_seconds)
                warm_errors[name].update(warm.errors)  # counted: the first burst is where start-up fails
                if warm.errors:
                    print(f"warm-up of {name}: {dict(warm.errors)}", file=sys.stderr)

        # The cost of waking a process, before anything is busy (an idle case meets it at each step).
        wake = round_trips(redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}").ping)
        # A few clients first: BentoML's dispatcher trains on its first batches (of 1, 2 and 3) and dermq's
        # children warm up. Not the full load: the dispatcher holds a lone request about as long as the
        # mean wait of its last 50 batches, and that wait feeds the mean, so right after a burst of 32
        # clients its idle p50 was 93 ms instead of 25-49 (see docs/PERFORMANCE.md).
        warm_up(min(4, args.clients))
        other_work = OtherWork(markers=(DATABASE,))  # dermq's Postgres backends are its own work
        sessions = {name: opener(0) for name, opener in openers.items()}
        idle, idle_errors = idle_latency(sessions, images, args.idle)
        for session in sessions.values():
            session.close()
        warm_up(args.clients)
        runs: dict[str, list[LoadRun]] = {name: [] for name in openers}
        # each system's own processes (and dermq's Postgres backends), not the client's: CPU per case
        roots = {"peer": {"peer": peer.process.proc.pid}, "dermq": {p.name: p.proc.pid for p in launched}}
        spent: dict[str, dict[str, float]] = {name: {} for name in openers}
        for number in range(args.rounds):
            for name in list(openers)[:: 1 if number % 2 == 0 else -1]:
                database = DATABASE if name == "dermq" else None
                before = cpu_by_role(roots[name], database=database)
                runs[name].append(closed_loop(openers[name], images, args.clients, args.seconds))
                after = cpu_by_role(roots[name], database=database)
                for part in set(before) - {"this process"}:
                    spent[name][part] = spent[name].get(part, 0.0) + after[part] - before[part]
                time.sleep(1)
            ceilings.append(ceiling())
        others, steal = other_work.shares()
        load_at_end = os.getloadavg()
        finished = True
    finally:
        stopped.set()
        for process in reversed(launched):
            process.stop()
        if peer is not None:
            peer.stop()
        if database_url is not None:
            support.drop_database(database_url)
        if not finished:
            print(f"the servers' logs are in {workdir}", file=sys.stderr)

    figures = {name: Figures(idle[name], runs[name], idle_errors[name] + warm_errors[name]) for name in openers}
    labels = (
        f"BentoML peer ({args.peer_workers} workers x 1 thread)",
        f"dermq make run ({api_processes} API, {children} children x {threads} thread)",
    )
    printed, met = comparison(
        figures["peer"],
        figures["dermq"],
        labels,
        (f"ONNX Runtime alone, batch 8 ({cores} threads, model only)", images_per_second(ceilings)),
        args.clients,
    )
    model_id = registry.read_manifest(args.model)["model_id"]
    print(
        f"dermq against a BentoML peer: the same model.onnx ({model_id}), the same client; {cores} CPUs, {processor()}"
    )
    print(f"images: {source}, sent in turn")
    print(
        f"peer: BentoML {versions['bentoml']}, {args.peer_workers} workers x 1 thread, ONNX Runtime "
        f"{versions['onnxruntime']} with 1 intra-op thread each, adaptive batching (at most {args.peer_max_batch} "
        f"a batch, {args.peer_max_latency_ms} ms bound); dermq's decoding and preprocessing; answers the label "
        "and the probabilities"
    )
    print(
        f"dermq: make run's layout, {api_processes} API process(es), 1 worker with {children} prefork children x "
        f"{threads} thread (ONNX Runtime, dynamic batches); "
        f"one request per case: POST /v1/cases?wait={args.wait:g}, "
        "then GET ?wait= until it ends; each case is also encrypted, stored, audited and given a heat map"
    )
    order = "alternating, the order flipping each round" if args.rounds > 1 else "peer first"
    print(
        f"idle: {args.idle} requests each, one at a time, taking turns; load: {args.clients} clients in a closed "
        f"loop, {args.seconds:g} s per run, {args.rounds} run(s) each ({order})"
    )
    start, end = (" / ".join(f"{v:.2f}" for v in load) for load in (load_at_start, load_at_end))
    print(
        f"load average (1/5/15 min) {start} at the start, {end} at the end; while it measured, other processes "
        f"kept {others:.0%} of the cores busy (an upper bound: kernel threads and Redis count) and the "
        f"hypervisor took {steal:.0%} (steal)"
    )
    print(
        f"a round trip to Redis, servers idle: {wake[0] * 1000:.2f} ms right after another, "
        f"{wake[1] * 1000:.2f} ms after 5 ms without one (the process, and its core, asleep: an idle "
        "case meets this at each of its steps)"
    )
    if load_at_start[0] > BUSY_LOAD_PER_CORE * cores or others + steal > 0.1:
        print(
            f"warning: other work shared the {cores} cores (load average {load_at_start[0]:.2f} at the start, "
            f"{others + steal:.0%} of the cores taken while it measured): absolute figures are not reliable; "
            "the ratios, measured interleaved, are what to read"
        )
    print(printed)
    print(cpu_per_case(spent, {name: sum(run.completed for run in runs[name]) for name in openers}))
    print("targets: " + "; ".join(f"{target}: {'met' if ok else 'NOT met'}" for target, ok in met.items()))
    for name, measured in figures.items():
        if measured.errors:
            print(f"errors of {name}: {dict(measured.error_kinds)}")
    if any(measured.errors for measured in figures.values()):
        print(f"the servers' logs are in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
