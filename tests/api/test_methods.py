"""A method a path does not take answers 405 with an ``Allow`` header naming every method the path
takes. Starlette named only those of the first route whose path matched, and the API has one route
per method on a path (GET and DELETE on a case): a portal told "GET" alone would never try DELETE."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("database")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/cases/00000000-0000-4000-8000-000000000000", {"GET", "DELETE"}),
        ("PATCH", "/v1/cases", {"GET", "POST"}),
        ("PATCH", "/v1/clinic/callback", {"GET", "PUT", "DELETE"}),
        ("PUT", "/v1/admin/clinics", {"GET", "POST"}),
        ("POST", "/docs", {"GET"}),  # outside the OpenAPI document
        ("POST", "/model-card", {"GET"}),
        ("POST", "/portal/", {"GET", "HEAD"}),  # the pages' static files say it themselves
    ],
)
def test_a_405_names_every_method_the_path_takes(client, method: str, path: str, allowed: set[str]) -> None:  # type: ignore[no-untyped-def]
    answer = client.request(method, path)
    assert answer.status_code == 405 and answer.json()["code"] == "method_not_allowed"
    assert answer.headers["content-type"] == "application/problem+json"
    assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed
