"""Load benchmark: concurrent clinic portals against the whole stack, and the reliability tally.

    python -m bench.load --clients 32 --seconds 60 [--concurrency 1] [--poll-interval 1.0 | --wait 20]
    python -m bench.load --base-url https://dermq.example --key dq_... [--database-url postgresql+psycopg2://...]

Each client is a thread with its own HTTP connection, acting as a clinic portal of a clinic of its
own (own stack; with ``--base-url`` all share ``--key``): it uploads a real image
(tests/fixtures/images) with an Idempotency-Key, then polls the case every ``--poll-interval``
seconds until it has ended, or with ``--wait S`` asks once with ``?wait=S`` on the submission and
long-polls, and submits the next (``--urgent-share`` of them urgent). A submission
that fails with a network error or a 5xx is retried with the same key (what a portal should do), so
a retry can never make a second case.
After ``--seconds`` the clients stop submitting and wait for what they have in flight (``--drain``
seconds at most).

Without ``--base-url`` it starts its own stack, as `make run` would: a scratch database
(``dermq_bench_load``), Redis database 10 (flushed), the API (uvicorn) and one Celery worker with
``--concurrency`` children as subprocesses, the recovery sweep every 5 s and the audit sealer every
second in threads (beat's jobs).

Reported: accepted, completed, lost (accepted but never ended, or not in the database: must be 0),
duplicated (cases beyond one per accepted submission, or more than one result for a case: must be
0), 4xx/5xx answers, intake latency (POST answered; with ``--wait``, the submissions answered 202
before their case ended) p50/p95/p99, submit-to-result p50/p95 (from the database: created_at to
finished_at; and as the client saw it, polling included), throughput, the audit sealing lag
(an event's time to the first signed checkpoint that covers it) p50/p99, and, with its own stack,
the CPU per completed case of the API, the worker (parent and children), the scratch database's
Postgres backends and this process (the portals, the sweeper, the sealer): where a case's cost goes
(:func:`bench.machine.cpu_by_role`).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.common import FIXTURE_IMAGES, camera_jpegs, ms, p50, percentile, stack_layout, table
from bench.load_stack import DATABASE, database_tally, layout_env, sealing_lag, server_intake, start_stack
from bench.machine import cpu_by_role, processor
from tests import processes


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    intake: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    ended: dict[str, str] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0

    def answer(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1


class Portal(threading.Thread):
    """One clinic portal: submit, poll until the case ends, repeat until told to stop."""

    def __init__(
        self, number: int, base_url: str, token: str, images: list[bytes], tally: Tally, args: argparse.Namespace
    ) -> None:
        self.wait = args.wait
        super().__init__(name=f"portal-{number}", daemon=True)
        self.number, self.images, self.tally, self.args = number, images, tally, args
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.stop_submitting = threading.Event()
        self.deadline = float("inf")
        self.rng = random.Random(number)

    def submit(self, image: bytes) -> tuple[str, float] | None:
        key = f"bench-{uuid.uuid4().hex}"
        started = time.perf_counter()  # from the first attempt: a retry's wait is the portal's wait too
        for _ in range(5):
            try:
                response = self.http.post(
                    f"/v1/cases?wait={self.wait:g}" if self.wait else "/v1/cases",
                    headers={"Idempotency-Key": key},
                    files={"image": ("lesion.jpg", image, "image/jpeg")},
                    data={"priority": "urgent" if self.rng.random() < self.args.urgent_share else "routine"},
                )
            except httpx.HTTPError as exc:
                with self.tally.lock:
                    self.tally.errors[type(exc).__name__] += 1
                    self.tally.retries += 1
                time.sleep(0.5)
                continue
            elapsed = time.perf_counter() - started
            self.tally.answer(response.status_code)
            if response.status_code == 201:  # ended within ?wait=: accepted and done in one request
                body = response.json()
                with self.tally.lock:
                    self.tally.accepted.append(body["id"])
                    self.tally.ended[body["id"]] = body["status"]
                    self.tally.seen.append(elapsed)
                return None
            if response.status_code in (200, 202):
                with self.tally.lock:
                    self.tally.intake.append(elapsed)
                    # 200: a retry's replay of a case the attempt before stored (its answer lost): this
                    # client's one case, not a duplicate, and lost if it never ends
                    self.tally.accepted.append(response.json()["id"])
                return response.json()["id"], started
            if response.status_code >= 500 or response.status_code == 429:
                with self.tally.lock:
                    self.tally.retries += 1
                time.sleep(float(response.headers.get("retry-after", "1")))
                continue
            return None  # a 4xx other than 429: a bug in this client, counted above
        return None

    def wait_done(self, case_id: str, started: float) -> None:
        while time.monotonic() < self.deadline:
            if not self.wait:
                time.sleep(self.args.poll_interval)
            try:
                query = f"?wait={self.wait:g}" if self.wait else ""
                response = self.http.get(f"/v1/cases/{case_id}{query}")
            except httpx.HTTPError as exc:
                with self.tally.lock:
                    self.tally.errors[type(exc).__name__] += 1
                continue
            self.tally.answer(response.status_code)
            if response.status_code == 200 and response.json()["status"] in ("succeeded", "failed"):
                with self.tally.lock:
                    self.tally.ended[case_id] = response.json()["status"]
                    self.tally.seen.append(time.perf_counter() - started)
                return

    def run(self) -> None:
        n = self.number
        while not self.stop_submitting.is_set():
            submitted = self.submit(self.images[n % len(self.images)])
            n += self.args.clients
            if submitted is not None:
                self.wait_done(*submitted)
        self.http.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clinic portals")
    parser.add_argument("--seconds", type=float, default=60, help="how long the portals keep submitting")
    parser.add_argument("--drain", type=float, default=300, help="seconds to wait for cases in flight afterwards")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between a portal's polls")
    parser.add_argument("--wait", type=float, default=0, help="long polls: ?wait= seconds (0: poll instead)")
    parser.add_argument("--api-processes", type=int, default=1, help="API processes (own stack only)")
    parser.add_argument("--concurrency", type=int, default=1, help="worker child processes (own stack only)")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads per worker child (own stack only; 1 leaves the API a core on a 2-core machine)",
    )
    parser.add_argument("--urgent-share", type=float, default=0.1, help="fraction of submissions marked urgent")
    parser.add_argument("--images", default=str(FIXTURE_IMAGES), help="folder of JPEGs to submit")
    parser.add_argument("--camera", action="store_true", help="submit 12-megapixel JPEGs (4000x3000) instead")
    parser.add_argument("--base-url", help="a running dermq API instead of starting a stack")
    parser.add_argument("--key", help="a clinic API key for --base-url")
    parser.add_argument("--database-url", help="with --base-url: its database, for the lost/duplicated checks")
    args = parser.parse_args(argv)
    if args.base_url and not args.key:
        parser.error("--base-url needs --key")

    images = camera_jpegs() if args.camera else [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    launched: list[processes.Process] = []
    stop_sweeper = threading.Event()
    api_log: Path | None = None
    workdir = Path(tempfile.mkdtemp(prefix="dermq-bench-load-"))  # key file and logs; removed at the end
    try:
        if args.base_url:
            base, database_url = args.base_url.rstrip("/"), args.database_url
            tokens = [args.key] * args.clients
        else:
            base, tokens, database_url, api_log = start_stack(args, workdir, launched, stop_sweeper)
            warm = Tally()
            warm_up = Portal(0, base, tokens[0], images, warm, args)
            case = warm_up.submit(images[0])  # the worker child loads the model on its first case
            if case is not None:
                warm_up.wait_done(*case)
        tally = Tally()
        portals = [Portal(i, base, tokens[i], images, tally, args) for i in range(args.clients)]
        roles = {p.name: p.proc.pid for p in launched}  # the API and the worker, own stack only
        cpu_before = cpu_by_role(roles, database=DATABASE) if roles else {}
        started, started_at = time.perf_counter(), time.time()
        run_started = datetime.now(UTC)
        for portal in portals:
            portal.start()
        time.sleep(args.seconds)
        deadline = time.monotonic() + args.drain
        for portal in portals:
            portal.deadline = deadline
            portal.stop_submitting.set()
        for portal in portals:
            portal.join(max(1.0, deadline - time.monotonic() + 5))
        wall = time.perf_counter() - started
        cpu_after = cpu_by_role(roles, database=DATABASE) if roles else {}
        lags: list[float] = []
        if not args.base_url:
            time.sleep(3)  # the sealer's last rounds
            lags = sealing_lag(database_url, run_started)
    finally:
        stop_sweeper.set()
        for process in reversed(launched):
            process.stop()

    asking = f"long polls ?wait={args.wait:g}" if args.wait else f"polls every {args.poll_interval:g} s"
    accepted = list(dict.fromkeys(tally.accepted))
    client_lost = [c for c in accepted if c not in tally.ended]
    codes = tally.statuses
    rows: list[list[str]] = [
        ["accepted (202, or 201 finished within ?wait=)", str(len(accepted))],
        ["completed (succeeded or failed, seen by the portal)", str(len(tally.ended))],
    ]
    if database_url:
        truth = database_tally(database_url, accepted)
        lost = len(accepted) - int(truth["terminal"])  # type: ignore[call-overload]
        duplicated = int(truth["extra_cases"]) + int(truth["multi_results"])  # type: ignore[call-overload]
        server = truth["server_latency"]
        rows += [
            ["lost (accepted, never ended in Postgres)", str(lost)],
            ["duplicated (extra cases + cases with >1 result)", str(duplicated)],
            ["  of which failed", str(truth["failed"])],
        ]
    else:
        server, lost = [], len(client_lost)
        rows += [["lost (accepted, never seen ending)", str(lost)], ["duplicated", "n/a (no --database-url)"]]
    rows += [
        ["4xx answers", str(sum(n for c, n in codes.items() if 400 <= c < 500))],
        ["5xx answers", str(sum(n for c, n in codes.items() if c >= 500))],
        ["network errors (retried)", str(sum(tally.errors.values()))],
        ["intake latency p50 / p95 / p99 (portal; 202s)", _quantiles(tally.intake)],
    ]
    if api_log is not None:
        rows.append(["intake latency p50 / p95 / p99 (API)", _quantiles(server_intake(api_log, started_at))])
    if server:
        rows.append(
            [
                "submit-to-result p50 / p95 (server)",
                f"{p50(server):.2f} s / {percentile(server, 95):.2f} s",  # type: ignore[arg-type]
            ]
        )
    if tally.seen:
        rows.append(
            [
                f"submit-to-result p50 / p95 (portal, {asking})",
                f"{p50(tally.seen):.2f} s / {percentile(tally.seen, 95):.2f} s",
            ]
        )
    rows += [
        ["throughput (completed / wall time)", f"{len(tally.ended) / wall:.2f} cases/s over {wall:.0f} s"],
        ["requests answered", str(sum(codes.values()))],
    ]
    if not args.base_url:
        rows.append(
            [
                "audit sealing lag p50 / p99 (event to its signed checkpoint)",
                f"{p50(lags):.2f} s / {percentile(lags, 99):.2f} s over {len(lags)} events",
            ]
        )
    if cpu_before and tally.ended:
        per_case = {
            name: 1000 * (cpu_after.get(name, 0.0) - spent) / len(tally.ended) for name, spent in cpu_before.items()
        }
        rows.append(
            [
                "CPU per completed case: " + " / ".join(per_case),
                " / ".join(f"{value:.1f}" for value in per_case.values()) + " ms",
            ]
        )
    own = f"own stack: {stack_layout(layout_env(args))}, a clinic per client, {asking}"
    print(
        f"dermq load benchmark: {args.clients} clients for {args.seconds:g} s (+ drain), {os.cpu_count()} CPUs "
        f"({processor()}), "
        f"{own if not args.base_url else base}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(table(["measure", "value"], rows))
    shutil.rmtree(workdir, ignore_errors=True)


def _quantiles(seconds: list[float]) -> str:
    """p50 / p95 / p99, or why there are none (with ``--wait``, every case may end within its wait,
    answered 201: no intake alone to time)."""
    if not seconds:
        return "none (every submission waited for its result)"
    return " / ".join(ms(percentile(seconds, q)) for q in (50, 95, 99))


if __name__ == "__main__":
    main()
