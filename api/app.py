"""The FastAPI application factory.

    uvicorn --factory api.app:create_app      # reads Settings from DERMQ_* variables

Start-up refuses to run without encryption keys (it never invents them). The app never loads the
model and never imports torch: it validates, encrypts, stores and publishes; the worker classifies.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api import docs_page, metrics, pages, problems
from api.db import Lanes
from api.deps import AppState, record_denial
from api.intake_limits import Decoder, UploadSlots, release_large_allocations
from api.key_cache import KeyCache
from api.listener import Listener
from api.loop_watchdog import LoopWatchdog
from api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from api.routes import admin, audit, audit_log, case_list, cases, clinic, fhir, health, outcomes
from api.waiters import CaseWaiters
from core import db_roles, heap
from core.config import Settings, get_settings
from core.cpus import usable_cpus
from core.crypto import KeyringSource
from core.db import session_factory
from core.logs import configure_logging
from core.publisher import make_publisher
from core.ratelimit import RateLimiter
from core.settings_problems import settings_or_exit

#: How long uvicorn keeps an idle client connection open (its default is 5 s). It must outlast the
#: proxy's idle connections to the API: nginx.conf's upstream keepalive_timeout (55 s) and
#: ingress-nginx's upstream-keepalive-timeout (60 s by default). Otherwise the proxy can send a
#: request on a connection that uvicorn has just closed, and answers 502 (a POST is not retried).
KEEP_ALIVE_SECONDS = 75

DESCRIPTION = """
dermq triages dermoscopy images of skin lesions into the seven HAM10000 classes, with calibrated
probabilities, an uncertainty figure, a referral flag and a Grad-CAM heat map. An image the model
cannot judge gets the result outcome `out_of_distribution` instead: no diagnosis, no heat map.

**Decision support for clinicians, not a diagnosis.** Authenticate every call but `/healthz` and
`/readyz` with `Authorization: Bearer <API key>`. Errors are RFC 9457 problem details with a stable
`code`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = KeyringSource(settings)
    keys.get()  # raises KeyringError: no keys, no start
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=2)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db_roles.refuse_insecure_login(settings)  # production: never as the audit tables' owner
        app.state.dermq.listener.start()  # key checks use the cache once it listens
        watchdog = LoopWatchdog()
        watchdog.start()
        beating = asyncio.create_task(metrics.heartbeat(watchdog), name="dermq-event-loop-heartbeat")
        yield
        watchdog.stop()
        beating.cancel()
        app.state.dermq.decoder.close()
        app.state.dermq.listener.close()
        app.state.dermq.lanes.close()
        client.close()

    app = FastAPI(
        title="dermq",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # /v1/cases/ is an unknown path (404), not a bodiless 307 to an address built from the Host header
        redirect_slashes=False,
        docs_url=None,  # api.docs_page serves /docs from a pinned package, not a CDN
        redoc_url=None,
        openapi_tags=[
            {"name": "cases", "description": "Submit dermoscopy images and read their triage"},
            {"name": "health", "description": "Liveness and readiness"},
        ],
    )
    docs_page.install(app)
    pages.install(app, settings)
    listener = Listener(settings.database_url)
    app.state.dermq = AppState(
        settings=settings,
        keys=keys,
        sessions=session_factory(settings),
        lanes=Lanes(),
        publisher=make_publisher(settings),
        redis=client,
        limiter=RateLimiter(client),
        uploads=UploadSlots(settings.max_concurrent_uploads_per_clinic, settings.upload_memory_bytes),
        decoder=Decoder(settings.decode_memory_bytes),
        listener=listener,
        waiters=CaseWaiters(listener, settings.long_poll_max_waiters),
        key_cache=KeyCache(listener, max_age=settings.key_cache_seconds),
    )
    problems.install(app, record_denial)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            # every method a route takes (PUT: a clinic's callback registration)
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            # every header docs/API.md tells a client to read (a browser portal sees only these), an
            # export's file name included
            expose_headers=["Location", "Retry-After", "X-Request-ID", "Idempotent-Replayed", "Content-Disposition"],
            max_age=600,
        )
    app.add_middleware(  # inside the request context: its 413 or 408 gets an id and headers
        BodyLimitMiddleware, idle_timeout=settings.upload_idle_timeout_seconds, timeout=settings.upload_timeout_seconds
    )
    app.add_middleware(RequestContextMiddleware)
    if settings.forwarded_allow_ips:  # outermost: the client address is settled before anything reads it
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    app.include_router(health.router)
    app.include_router(cases.router)
    app.include_router(case_list.router)
    app.include_router(fhir.router)
    app.include_router(outcomes.router)
    app.include_router(audit.router)
    app.include_router(audit_log.router)
    app.include_router(admin.router)
    app.include_router(clinic.router)
    return app


def create_served_app() -> FastAPI:
    """The app of one of several ``dermq-api`` processes (uvicorn spawns each, a new interpreter whose
    logging :func:`main` never configured): :func:`served_app`, logging as :func:`main` does."""
    settings = settings_or_exit()
    configure_logging(settings.log_level, json_lines=settings.log_json, component="api")
    return served_app(settings)


def served_app(settings: Settings) -> FastAPI:
    """:func:`create_app` in a process set up to serve (:func:`_serving_process`), its heap then
    frozen out of garbage collection (:func:`core.heap.settle`): what each ``dermq-api`` process serves."""
    _serving_process()
    app = create_app(settings)
    heap.settle("api")
    return app


def _serving_process() -> None:
    """Process-wide settings made only where the API serves: freed image canvases go back to the
    system, and SIGUSR1 writes every thread's stack to stderr (the container's log), for a process
    whose event loop is stuck (deploy/RUNBOOK.md, DermqApiNotServing). A process spawned by the
    supervisor starts with SIGUSR1 blocked (:func:`_hold_sigusr1_for_the_processes`); one that came
    while it started was held, and is answered now."""
    release_large_allocations()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def _hold_sigusr1_for_the_processes() -> None:
    """The supervisor's SIGUSR1. A handler does not survive the exec of a spawned API process but a
    blocked signal does: blocked in the thread that spawns them, SIGUSR1 waits in a starting process
    (whose default action would end it: the runbook sends SIGUSR1 to every API process, and uvicorn
    restarts one at any time) until :func:`_serving_process` has its handler in place. The supervisor
    itself takes SIGUSR1 in a thread of its own and writes every thread's stack, as each process does."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a thread started before the block
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def take() -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            faulthandler.dump_traceback(all_threads=True)

    threading.Thread(target=take, name="dermq-sigusr1", daemon=True).start()


def api_processes(settings: Settings) -> int:
    """How many API processes to run: ``DERMQ_API_PROCESSES``, or with 0 one per usable core."""
    if settings.api_processes:
        return settings.api_processes
    return usable_cpus()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The options ``dermq-api`` gives ``uvicorn.run``, whatever the number of processes."""
    tls: dict[str, str] = {}
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        tls = {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
    return {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,  # create_app adds the middleware, for the configured proxies only
        "server_header": False,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        **tls,
    }


def main() -> None:
    """``dermq-api``: run the API with uvicorn, configured from Settings, in ``api_processes`` processes
    (uvicorn's supervisor restarts one that dies; metrics are served once, by the supervisor)."""
    import uvicorn

    settings = settings_or_exit()
    configure_logging(settings.log_level, json_lines=settings.log_json, component="api")
    processes = api_processes(settings)
    common = uvicorn_options(settings)
    if processes == 1:
        app = served_app(settings)
        metrics.serve(app.state.dermq)  # its own listener: /metrics never shares the public port
        uvicorn.run(app, **common)
        return
    _hold_sigusr1_for_the_processes()  # before any thread or process starts: each inherits the block
    # The processes count into files of a folder they share; the supervisor serves their sum.
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dermq-api-metrics-")
    try:
        metrics.serve(create_app(settings).state.dermq, processes=processes)
        uvicorn.run("api.app:create_served_app", factory=True, workers=processes, **common)
    finally:  # the processes have ended: their samples go with them (each restart left a folder behind)
        shutil.rmtree(folder, ignore_errors=True)
