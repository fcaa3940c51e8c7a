"""Routes for one role refuse every other key before looking at what it sent: a clinic key sending a
malformed clinic id to an admin route was told 422 about the id (learning the route's shape) instead
of 403, and its refusal was not audited as a denial. The role's own keys are still told what is wrong."""

from __future__ import annotations

import re

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from sqlalchemy import select

from api.routes import admin, audit, audit_log
from core.db import session_scope
from core.models import AuditEvent
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")

MALFORMED = "not-a-uuid"
#: every parameter of these routes that a malformed value can fail, in the query (only one route takes each)
MALFORMED_QUERY = {
    "clinic_id": MALFORMED,
    "case": MALFORMED,
    "since": "yesterday",
    "event": "first",
    "from": "-1",
    "format": "xml",
    "limit": "0",
    "unknown": "1",
}


def requests_of(router: APIRouter) -> list[tuple[str, str]]:
    """(method, path) of every route of ``router``, a malformed id in each path parameter."""
    return [
        (method, re.sub(r"\{[^}]+\}", MALFORMED, route.path))
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]


def denials(settings, key: Tenant) -> list[tuple[str, str, dict[str, str]]]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor_key_id == key.key_id)).all()
    return [(e.action, e.outcome, e.detail) for e in events]


@pytest.mark.parametrize(
    ("routers", "others"),
    [((admin.router,), ("clinic", "auditor")), ((audit.router, audit_log.router), ("clinic", "admin"))],
    ids=["admin", "auditor"],
)
def test_another_role_gets_the_same_audited_403_whatever_it_sends(  # type: ignore[no-untyped-def]
    client, make_key, settings, routers, others
) -> None:
    asked = [request for router in routers for request in requests_of(router)]
    assert len(asked) >= 6
    for role in others:
        key = make_key(role)
        for method, path in asked:
            body = {"clinic_id": MALFORMED, "role": 7} if method == "POST" else None
            refused = client.request(method, path, headers=key.headers, params=MALFORMED_QUERY, json=body)
            assert (refused.status_code, refused.json()["code"]) == (403, "role_not_allowed"), (method, path)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "clinic_id" not in refused.text and "errors" not in refused.json()
        assert denials(settings, key) == len(asked) * [("access.denied", "denied", {"reason": "role", "role": role})]


def test_an_admin_is_told_its_malformed_id_and_nothing_changes(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("admin")
    for method, path, params in (
        ("POST", f"/v1/admin/clinics/{MALFORMED}/deactivate", None),
        ("POST", f"/v1/admin/clinics/{MALFORMED}/activate", None),
        ("POST", f"/v1/admin/keys/{MALFORMED}/revoke", None),
        ("GET", "/v1/admin/keys", {"clinic_id": MALFORMED}),
    ):
        refused = client.request(method, path, headers=key.headers, params=params)
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_input"), (path, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["errors"][0]["loc"][-1] in ("clinic_id", "key_id")  # says which
    assert denials(settings, key) == []  # nothing done, nothing listed


def test_an_auditor_is_told_its_malformed_parameter(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("auditor")
    for path, params in (
        ("/v1/audit-events", {"case": MALFORMED}),
        ("/v1/audit-events/export", {"since": "yesterday"}),
        ("/v1/audit/proofs/inclusion", {"event": "first"}),
    ):
        refused = client.get(path, headers=key.headers, params=params)
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_input"), (path, refused.text)
    assert denials(settings, key) == []
