"""The clinic's routes (cases, their heat maps, FHIR views and outcomes, the case list, the clinic's
callback) refuse an admin or auditor key before looking at what it sent: such a key sending
``GET /v1/cases/not-a-uuid``, ``GET /v1/cases?limit=0`` or a malformed outcome was told 422 about
the route's parameters, and its refusal went unaudited. The early refusal is audited exactly as the
refusal of a well-formed request always was (``case.read`` for a read, ``access.denied`` for a
callback route...), so auditors' searches keep finding them; a clinic key is still told what is
malformed."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select

from api.routes import case_list, cases, clinic, fhir, outcomes
from core.db import session_scope
from core.models import AuditEvent
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")

ROUTERS = (cases.router, case_list.router, fhir.router, outcomes.router, clinic.router)
MALFORMED = "not-a-uuid"
#: what each route's refusal of another role's key is audited as today: (action, entity type, whether
#: the entity is the case in the path, detail beside the reason and role)
REFUSALS: dict[tuple[str, str], tuple[str, str | None, bool, dict[str, str]]] = {
    ("POST", "/v1/cases"): ("access.denied", None, False, {}),
    ("GET", "/v1/cases"): ("case.list", "case", False, {}),
    ("GET", "/v1/cases/{case_id}"): ("case.read", "case", True, {}),
    ("GET", "/v1/cases/{case_id}/heatmap.png"): ("heatmap.read", "case", True, {}),
    ("DELETE", "/v1/cases/{case_id}"): ("case.delete", "case", True, {}),
    ("GET", "/v1/cases/{case_id}/fhir"): ("case.read", "case", True, {"format": "fhir"}),
    ("POST", "/v1/cases/{case_id}/outcome"): ("case.outcome", "case", True, {}),
    ("PUT", "/v1/clinic/callback"): ("access.denied", None, False, {}),
    ("GET", "/v1/clinic/callback"): ("access.denied", None, False, {}),
    ("DELETE", "/v1/clinic/callback"): ("access.denied", None, False, {}),
    ("DELETE", "/v1/clinic/callback/previous-secret"): ("access.denied", None, False, {}),
}
#: a well-formed JSON body for each route that takes one
BODIES = {
    ("POST", "/v1/cases/{case_id}/outcome"): {"diagnosis": "mel", "method": "histo"},
    ("PUT", "/v1/clinic/callback"): {"url": "https://portal.example.org/dermq/callback"},
}
#: every query parameter of these routes, each malformed (and one no route takes)
MALFORMED_QUERY = {
    "wait": "-1",
    "status": "nope",
    "priority": "nope",
    "since": "yesterday",
    "limit": "0",
    "unknown": "1",
}


def routes() -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]


def events(settings, key: Tenant) -> list[tuple[str, str, str | None, str | None, dict[str, Any]]]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.actor_key_id == key.key_id).order_by(AuditEvent.id)
        ).all()
    return [(e.action, e.outcome, e.entity_type, e.entity_id, e.detail) for e in rows]


def variants(method: str, template: str, case_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, request arguments): the well-formed request, then each malformed one the route can get."""
    path = template.replace("{case_id}", case_id)
    body = BODIES.get((method, template))
    well_formed: dict[str, Any] = {"json": body} if body is not None else {}
    if template == "/v1/cases" and method == "POST":
        well_formed = {"files": {"image": ("lesion.jpg", b"\xff\xd8\xff", "image/jpeg")}}
    found = [("well-formed", path, well_formed), ("query", path, {**well_formed, "params": MALFORMED_QUERY})]
    if "{case_id}" in template:
        found.append(("path", re.sub(r"\{[^}]+\}", MALFORMED, template), well_formed))
        # one that uuid.UUID reads (as the nil UUID) and the route refuses: no case is named either
        found.append(("lenient path", template.replace("{case_id}", "+0000000_00000000000000000000000"), well_formed))
    if body is not None:
        found.append(("body", path, {"json": {name: 7 for name in body} | {"extra": True}}))
        found.append(("media type", path, {"content": b"url=x", "headers": {"Content-Type": "text/plain"}}))
    return found


def test_every_clinic_route_has_its_refusal_named() -> None:
    assert sorted(routes()) == sorted(REFUSALS)


#: the checks that refuse another role's key before a route's parameters (api.role_checks)
ROLE_CHECKS = ("role_allowed", "clinic_key")
#: route modules whose routes take no key (health, readiness, metrics)
KEYLESS = ("health",)


def test_every_router_that_takes_a_key_checks_the_role_before_its_parameters() -> None:
    """Not only the routes of the routers above: a router module added to api/routes later needs the
    check too (a router dependency, or each route's first), or a place in KEYLESS."""
    import importlib
    import pkgutil

    from api import routes as route_modules

    unchecked = []
    for info in pkgutil.iter_modules(route_modules.__path__):
        router = getattr(importlib.import_module(f"api.routes.{info.name}"), "router", None)
        if router is None or info.name in KEYLESS:
            continue
        if any(getattr(d.dependency, "__name__", "") in ROLE_CHECKS for d in router.dependencies):
            continue
        for route in router.routes:
            first = route.dependencies[0].dependency if isinstance(route, APIRoute) and route.dependencies else None
            if isinstance(route, APIRoute) and getattr(first, "__name__", "") not in ROLE_CHECKS:
                unchecked.append((info.name, sorted(route.methods), route.path))
    assert unchecked == []


@pytest.mark.parametrize("role", ["admin", "auditor"])
def test_another_role_gets_the_routes_audited_403_whatever_it_sends(client, make_key, settings, role) -> None:  # type: ignore[no-untyped-def]
    key = make_key(role)
    expected = []
    for method, template in routes():
        action, entity_type, names_case, detail = REFUSALS[(method, template)]
        case_id = str(uuid.uuid4())
        for name, path, arguments in variants(method, template, case_id):
            headers = key.headers | arguments.pop("headers", {})
            refused = client.request(method, path, headers=headers, **arguments)
            where = (method, path, name)
            assert (refused.status_code, refused.json()["code"]) == (403, "role_not_allowed"), (where, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "errors" not in refused.json(), where
            malformed = name in ("path", "lenient path")
            entity_id = case_id if names_case and not malformed else None  # a malformed id is not recorded
            expected.append((action, "denied", entity_type, entity_id, {"reason": "role", "role": role, **detail}))
    assert events(settings, key) == expected


def test_a_clinic_key_is_told_what_is_malformed(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("clinic")
    outcome = BODIES[("POST", "/v1/cases/{case_id}/outcome")]
    for method, path, arguments, code, field in (
        ("GET", f"/v1/cases/{MALFORMED}", {}, "invalid_input", "case_id"),
        ("GET", f"/v1/cases/{MALFORMED}/heatmap.png", {}, "invalid_input", "case_id"),
        ("GET", f"/v1/cases/{MALFORMED}/fhir", {}, "invalid_input", "case_id"),
        ("DELETE", f"/v1/cases/{MALFORMED}", {}, "invalid_input", "case_id"),
        ("POST", f"/v1/cases/{MALFORMED}/outcome", {"json": outcome}, "invalid_input", "case_id"),
        ("GET", "/v1/cases", {"params": {"limit": "0"}}, "invalid_input", "limit"),
        ("POST", "/v1/cases", {"params": {"wait": "-1"}}, "invalid_input", "wait"),
        ("PUT", "/v1/clinic/callback", {"json": {"url": 7}}, "invalid_input", "url"),
        ("DELETE", "/v1/clinic/callback", {"params": {"dry_run": "true"}}, "unknown_parameter", None),
    ):
        refused = client.request(method, path, headers=key.headers, **arguments)
        assert (refused.status_code, refused.json()["code"]) == (422, code), (method, path, refused.text)
        if field is not None:
            assert refused.json()["errors"][0]["loc"][-1] == field, (method, path, refused.text)
    assert [e for e in events(settings, key) if e[1] == "denied"] == []
    # and its well-formed requests reach the route
    assert client.get("/v1/cases", headers=key.headers).status_code == 200
    missing = client.get("/v1/clinic/callback", headers=key.headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "callback_not_registered")
    unknown = client.get(f"/v1/cases/{uuid.uuid4()}/fhir", headers=key.headers)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "case_not_found")
