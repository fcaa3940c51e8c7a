"""Per-request work that never blocks stays on the event loop. FastAPI sends every plain-function
dependency and endpoint to its thread pool and back: CPU on every request (on this project's 2-core
VM a hop cost about 0.5 ms of the API's CPU per request; /healthz went from 1.7 to 1.1 ms) and a pool
slot that a busy API may not have free. Only work that waits on Postgres, Redis or files may be a
plain function."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute

#: endpoints that wait on Postgres or Redis (readiness), or read files (model cards)
BLOCKING_ENDPOINTS = {"readyz", "served_model_card", "named_model_card"}


def _plain_dependencies(dependant: Any) -> Iterator[str]:
    for dependency in dependant.dependencies:
        call = dependency.call
        if call is not None and not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
            yield getattr(call, "__name__", repr(call))
        yield from _plain_dependencies(dependency)


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, those of included routers too (FastAPI keeps an included router as one entry)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            assert not getattr(route.include_context, "dependencies", None), "router-wide dependencies: check them too"
            yield from _api_routes(route.original_router.routes)


def test_no_route_sends_work_that_never_blocks_to_the_thread_pool(api_app) -> None:  # type: ignore[no-untyped-def]
    routes = list(_api_routes(api_app.routes))
    assert len(routes) > 20
    found = [
        f"{route.path} endpoint {route.endpoint.__name__}"
        for route in routes
        if not inspect.iscoroutinefunction(route.endpoint) and route.endpoint.__name__ not in BLOCKING_ENDPOINTS
    ]
    found += [f"{route.path} dependency {name}" for route in routes for name in _plain_dependencies(route.dependant)]
    assert found == []
