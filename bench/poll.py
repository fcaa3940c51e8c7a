"""What one read costs the API: server CPU per poll, with and without the cache of verified keys, and
what a long poll saves a portal.

    python -m bench.poll [--polls 400]

Starts the API (uvicorn, one process) on a scratch database (``dermq_bench_poll``) twice, once with
``DERMQ_KEY_CACHE_SECONDS=0`` (every request checks its key in the database: a keyed hash and a
query, as before the cache) and once with the cache, and sends the same polls of one queued case to
each, alternating in rounds. The API process's CPU time (user + system, from /proc) is divided by
the polls answered. Then: the requests a portal makes for one case that ends after 2 s, polling
every 0.5 s against one long poll.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from bench.common import table
from tests import processes, support

DATABASE = "dermq_bench_poll"
REDIS_DB = 9


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_api(env: dict[str, str], workdir: Path, name: str, **overrides: str) -> tuple[processes.Process, str]:
    port = support.free_port()
    process = processes.Process(
        name, [str(support.VENV_BIN / "dermq-api")], {**env, "DERMQ_API_PORT": str(port), **overrides}, workdir / name
    )
    base = f"http://127.0.0.1:{port}"
    support.wait_for(lambda: processes.api_up(base) or not process.alive(), timeout=60, what=f"the API ({name})")
    if not process.alive():
        raise RuntimeError(process.output()[-2000:])
    return process, base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.poll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=400, help="polls per variant (in 4 alternating rounds)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dermq-bench-poll-"))
    env = support.test_env(
        workdir,
        DERMQ_DATABASE_URL=f"postgresql+psycopg2:///{DATABASE}",
        DERMQ_REDIS_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        DERMQ_LOG_LEVEL="WARNING",
    )
    settings, _, token = support.prepare_stack(env, "bench-poll")
    headers = {"Authorization": f"Bearer {token}"}
    launched: list[processes.Process] = []
    try:
        uncached, base_uncached = start_api(env, workdir, "api-uncached", DERMQ_KEY_CACHE_SECONDS="0")
        launched.append(uncached)
        cached, base_cached = start_api(env, workdir, "api-cached")
        launched.append(cached)
        image = next(iter(sorted(support.ROOT.joinpath("tests/fixtures/images").glob("*.jpg")))).read_bytes()
        with httpx.Client(timeout=30) as http:
            case = http.post(
                f"{base_cached}/v1/cases", headers=headers, files={"image": ("l.jpg", image, "image/jpeg")}
            ).json()["id"]
            variants = {
                "key checked in the database (baseline)": (uncached, base_uncached),
                "key cache": (cached, base_cached),
            }
            spent = dict.fromkeys(variants, 0.0)
            walls = dict.fromkeys(variants, 0.0)
            for _process, base in variants.values():  # warm up: connections, the key cache, the listener
                for _ in range(20):
                    http.get(f"{base}/v1/cases/{case}", headers=headers)
            rounds = 4
            for _ in range(rounds):
                for name, (process, base) in variants.items():
                    before, started = cpu_seconds(process.proc.pid), time.perf_counter()
                    for _ in range(args.polls // rounds):
                        assert http.get(f"{base}/v1/cases/{case}", headers=headers).status_code == 200
                    walls[name] += time.perf_counter() - started
                    spent[name] += cpu_seconds(process.proc.pid) - before

            # One case ending after 2 s: polling every 0.5 s against one long poll.
            from core import case_states
            from core.db import session_scope

            def end_later(case_id: str) -> None:
                time.sleep(2)
                with session_scope(settings) as session:
                    case_states.fail_case(
                        session, case_id=uuid.UUID(case_id), attempt=None, code="timeout", message="bench"
                    )

            requests = {}
            for mode in ("poll every 0.5 s", "long poll ?wait=20"):
                case_id = http.post(
                    f"{base_cached}/v1/cases", headers=headers, files={"image": ("l.jpg", image, "image/jpeg")}
                ).json()["id"]
                ender = threading.Thread(target=end_later, args=(case_id,))
                ender.start()
                sent = 0
                while True:
                    sent += 1
                    query = "?wait=20" if mode.startswith("long") else ""
                    status = http.get(f"{base_cached}/v1/cases/{case_id}{query}", headers=headers).json()["status"]
                    if status in ("succeeded", "failed"):
                        break
                    if not query:
                        time.sleep(0.5)
                ender.join()
                requests[mode] = sent
    finally:
        for process in launched:
            process.stop()
        support.drop_database(settings.database_url)

    per = args.polls // rounds * rounds
    base_cpu = spent["key checked in the database (baseline)"] / per
    rows = [
        [
            name,
            f"{spent[name] / per * 1000:.2f}",
            f"{walls[name] / per * 1000:.2f}",
            f"{spent[name] / per / base_cpu:.2f}x",
        ]
        for name in spent
    ]
    print(
        f"dermq poll cost: {per} polls of one case per variant, interleaved in {rounds} rounds; {os.cpu_count()} CPUs"
    )
    print(table(["variant", "API CPU ms / poll", "wall ms / poll", "CPU vs baseline"], rows))
    print(
        table(
            ["portal waiting for one case that ends after 2 s", "requests"], [[k, str(v)] for k, v in requests.items()]
        )
    )


if __name__ == "__main__":
    main()
