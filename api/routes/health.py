"""Liveness and readiness for load balancers and orchestrators (no authentication, no data).

``/readyz`` answers within :data:`READINESS_BOUND_S`, under the orchestrator's probe timeout (3 s in
deploy/k8s): a dependency that has not answered by then counts as unreachable, and the probe's own
wait never blocks a request's thread. A process whose every database connection is in use is
*busy*, not down, and stays ready: taking it out of rotation would move its load onto replicas that
are as loaded as it is, and the requests it cannot serve in time are already answered 503
``database_busy`` with Retry-After (docs/API.md). A pool that stays full shows in that error's rate
(DermqApiHigh5xxRate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Response
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from api.deps import State
from api.schemas import Health, Readiness
from core.db import get_engine

router = APIRouter(tags=["health"])

#: seconds a readiness check waits for each dependency
READINESS_BOUND_S = 2.0
NO_ANSWER = f"unreachable (no answer in {READINESS_BOUND_S:g} s)"
#: the checks' blocking calls run here, never on the request threads: a dependency that hangs holds
#: at most these two threads, and a probe that finds them taken times out as unreachable
_CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dermq-readyz")


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

    def busy() -> bool:  # every connection of the pool serves a request
        pool = engine.pool
        return isinstance(pool, QueuePool) and pool.checkedout() >= pool.size()

    redis_answer = asyncio.ensure_future(_answer(app.redis.ping))
    postgres_answer = "busy" if busy() else await _answer(postgres)
    if postgres_answer == NO_ANSWER and busy():  # the pool's last connection was taken meanwhile
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


async def _answer(check: Callable[[], object]) -> str:
    """ "ok", or why not: the check raised, or gave no answer within READINESS_BOUND_S."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_CHECKS, check), READINESS_BOUND_S)
    except TimeoutError:
        return NO_ANSWER
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"
