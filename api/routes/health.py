"""Liveness and readiness for load balancers and orchestrators (no authentication, no data).

``/readyz`` answers within about :data:`READINESS_BOUND_S`, under the orchestrator's probe timeout (3 s
in deploy/k8s): a dependency that has not answered by then counts as unreachable. Its checks run on
threads of their own, at most :data:`CHECK_THREADS` at once (a check stuck on a vanished peer holds
one until TCP keepalives end it, about a minute: core.db), never on a request's thread.

A process whose every database connection is in use, and whose pool has given one back within the
bound, is *busy*, not down, and stays ready: taking it out of rotation would move its load onto
replicas as loaded as it, and the requests it cannot serve in time are already answered 503
``database_busy`` with Retry-After (docs/API.md). A full pool that has given nothing back for that
long waits on a database that does not answer: not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from fastapi import APIRouter, Response
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from api.deps import State
from api.schemas import Health, Readiness
from core.db import get_engine, seconds_since_a_connection_was_returned

router = APIRouter(tags=["health"])

#: seconds a readiness check waits for each dependency
READINESS_BOUND_S = 2.0
NO_ANSWER = f"unreachable (no answer in {READINESS_BOUND_S:g} s)"
#: check threads that may be under way at once (each dependency of each app has at most one: probes
#: that come while it runs wait for its answer); a probe that finds them all taken counts as no answer
CHECK_THREADS = 4
_slots = threading.BoundedSemaphore(CHECK_THREADS)
_under_way: dict[tuple[str, int], asyncio.Future[BaseException | None]] = {}


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Postgres and Redis are reachable",
)
async def readyz(app: State, response: Response) -> Readiness:
    engine = get_engine(app.settings)

    def postgres() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def full() -> bool:  # each connection serves a request
        pool = engine.pool
        return isinstance(pool, QueuePool) and pool.checkedout() >= pool.size()

    def busy() -> bool:  # and one came back a moment ago: the database answers them
        returned = seconds_since_a_connection_was_returned(engine)
        return full() and returned is not None and returned < READINESS_BOUND_S

    redis_answer = asyncio.ensure_future(_answer("redis", app.redis, app.redis.ping))
    postgres_answer = NO_ANSWER if full() else await _answer("postgres", engine, postgres)
    if postgres_answer == NO_ANSWER and busy():  # full before the check, or filled while it waited
        postgres_answer = "busy"
    checks = {"postgres": postgres_answer, "redis": await redis_answer}
    ready = all(value in ("ok", "busy") for value in checks.values())
    if not ready:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
    response.headers["Cache-Control"] = "no-store"
    return Readiness(status="ready" if ready else "not_ready", checks=checks)


# HEAD too, the same answer without its body: uptime checkers and load balancers often ask with it
# (FastAPI routes GET alone, and answered 405). Left out of the OpenAPI document, which has the GETs.
router.add_api_route("/healthz", healthz, methods=["HEAD"], response_model=Health, include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], response_model=Readiness, include_in_schema=False)


async def _answer(name: str, target: object, check: Callable[[], object]) -> str:
    """The answer "ok", or why not: the check raised, or gave no answer within READINESS_BOUND_S. It
    runs on a daemon thread (one stuck on a dead peer must not hold up the process's exit); probes
    that come while a check of the same dependency runs wait for its answer instead of starting one."""
    loop = asyncio.get_running_loop()
    key = (name, id(target))
    running = _under_way.get(key)
    if running is None or running.done() or running.get_loop() is not loop:
        if not _slots.acquire(blocking=False):
            return NO_ANSWER  # every check thread still waits on a dependency that does not answer
        running = _under_way[key] = loop.create_future()
        _start(check, loop, running, key)
    try:
        failure = await asyncio.wait_for(asyncio.shield(running), READINESS_BOUND_S)
    except TimeoutError:
        return NO_ANSWER
    return "ok" if failure is None else f"unreachable ({type(failure).__name__})"


def _start(
    check: Callable[[], object],
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Future[BaseException | None],
    key: tuple[str, int],
) -> None:
    def settle(outcome: BaseException | None) -> None:
        if _under_way.get(key) is done:
            del _under_way[key]
        if not done.done():
            done.set_result(outcome)

    def run() -> None:
        outcome: BaseException | None = None
        try:
            check()
        except Exception as exc:
            outcome = exc
        finally:
            _slots.release()
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome)

    try:
        threading.Thread(target=run, name="dermq-readyz", daemon=True).start()
    except RuntimeError as exc:  # no thread could be started: this probe's answer, and nothing left held
        _slots.release()
        settle(exc)
