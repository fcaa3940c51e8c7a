"""The client side of :mod:`bench.peer`: one session type per system, with the same interface, and
the harness both go through (idle requests taking turns, a closed loop of concurrent clients)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from bench.common import interleaved

TERMINAL = ("succeeded", "failed")


class Failed(Exception):
    """A request that did not end with a label."""


class Session(Protocol):
    def classify(self, image: bytes) -> str:
        """The label of ``image``; raises on any other outcome."""
        ...

    def close(self) -> None: ...


class PeerSession:
    """A client of the BentoML peer: one image per request, the label from its answer."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=60)

    def classify(self, image: bytes) -> str:
        response = self.http.post("/classify", files={"images": ("lesion.jpg", image, "image/jpeg")})
        if response.status_code != 200:
            raise Failed(f"HTTP {response.status_code}")
        return str(response.json()[0]["label"])

    def close(self) -> None:
        self.http.close()


class DermqSession:
    """One clinic portal: one request per case (``?wait=``), long polls if the case outlasts it."""

    def __init__(self, base: str, token: str, wait: float) -> None:
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=wait + 30)
        self.wait = wait

    def classify(self, image: bytes) -> str:
        response = self.http.post(
            f"/v1/cases?wait={self.wait:g}",
            headers={"Idempotency-Key": f"bench-peer-{uuid.uuid4().hex}"},
            files={"image": ("lesion.jpg", image, "image/jpeg")},
        )
        while response.status_code in (200, 202) and response.json()["status"] not in TERMINAL:
            response = self.http.get(f"/v1/cases/{response.json()['id']}?wait={self.wait:g}")
        if response.status_code not in (200, 201):
            raise Failed(f"HTTP {response.status_code}")
        case = response.json()
        if case["status"] != "succeeded":
            raise Failed(f"case {case['status']}: {(case.get('failure') or {}).get('code')}")
        result = case["result"]
        # an image the gate finds out of distribution succeeds with no label: an answer, not an error
        return str(result["label"] if result["outcome"] == "diagnosis" else result["outcome"])

    def close(self) -> None:
        self.http.close()


# ---------------------------------------------------------------- the harness both systems go through


@dataclass
class LoadRun:
    seconds: float
    completed: int  # answered within the window
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds


def failure(exc: Exception) -> str:
    return str(exc) if isinstance(exc, Failed) else type(exc).__name__


def closed_loop(open_session: Callable[[int], Session], images: list[bytes], clients: int, seconds: float) -> LoadRun:
    """``clients`` threads, each with its own connection, sending its next image as soon as the last
    is answered, for ``seconds``; what is in flight then is waited for but not counted as completed."""
    sessions = [open_session(i) for i in range(clients)]
    lock, ends, run = threading.Lock(), [], LoadRun(seconds, 0)
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(number: int) -> None:
        session, n = sessions[number], number
        start.wait()
        while time.perf_counter() < deadline[0]:
            image, n = images[n % len(images)], n + clients
            started = time.perf_counter()
            try:
                session.classify(image)
            except Exception as exc:
                with lock:
                    run.errors[failure(exc)] += 1
                time.sleep(0.1)  # a server refusing at once must not turn the loop into a busy spin
                continue
            ended = time.perf_counter()
            with lock:
                run.latencies.append(ended - started)
                ends.append(ended)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + 120)
    for session in sessions:
        session.close()
    run.completed = sum(end <= deadline[0] for end in ends)
    return run


def idle_latency(
    sessions: dict[str, Session], images: list[bytes], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Counter[str]]]:
    """Seconds per request of each system, one request at a time, taking turns request by request
    (the same images in the same order to each); and each system's failures by kind."""
    errors: dict[str, Counter[str]] = {name: Counter() for name in sessions}

    def caller(name: str, session: Session) -> Callable[[], None]:
        count = [0]

        def call() -> None:
            image, count[0] = images[count[0] % len(images)], count[0] + 1
            try:
                session.classify(image)
            except Exception as exc:
                errors[name][failure(exc)] += 1

        return call

    return interleaved({name: caller(name, s) for name, s in sessions.items()}, repeats, warmup=10), errors
