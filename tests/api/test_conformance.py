"""API conformance: schemathesis generates requests from dermq's own OpenAPI schema, with valid keys,
and every response must be a non-5xx that matches the schema (status code, headers, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.usefixtures("database")


ROLE_FOR_TAG = {"cases": "clinic", "clinic": "clinic", "audit": "auditor", "admin": "admin", "health": None}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def own_app(api_app):  # type: ignore[no-untyped-def]
    """An app of this module's own: schemathesis runs the app's startup and shutdown around its calls,
    and the session's shared app (``api_app``) must keep its listener for the tests that follow."""
    from api.app import create_app

    return create_app(api_app.state.dermq.settings)


@pytest.fixture(scope="module")
def keys_by_role(own_app):  # type: ignore[no-untyped-def]
    import uuid

    from core import clinics, keys
    from core.crypto import load_keyring
    from core.db import session_scope
    from core.models import Role

    settings_ = own_app.state.dermq.settings
    out = {}
    with session_scope(settings_) as session:
        clinic = clinics.create_clinic(session, f"conformance-{uuid.uuid4().hex[:6]}")
        for role in (Role.CLINIC, Role.AUDITOR, Role.ADMIN):
            _, token = keys.create_key(
                session, load_keyring(settings_), role=role, clinic_id=clinic.id if role is Role.CLINIC else None
            )
            out[role.value] = token
    return out


def test_every_operation_conforms(own_app, keys_by_role) -> None:  # type: ignore[no-untyped-def]
    # schemathesis's pytest plugin does not run under pytest 9; drive Hypothesis directly instead.
    schema = schemathesis.openapi.from_asgi("/openapi.json", own_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        role = ROLE_FOR_TAG[(operation.tags or ["health"])[0]]
        headers = {"Authorization": f"Bearer {keys_by_role[role]}"} if role else {}

        exercise(operation, headers)


def exercise(operation, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    @given(case=operation.as_strategy())
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:  # type: ignore[no-untyped-def]
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()
