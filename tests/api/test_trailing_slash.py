"""An API path with a trailing slash is an unknown path: 404 ``not_found``, a problem document, and
nothing stored. Starlette answered it with a bodiless 307 to the path without the slash, at an
absolute URL built from the request's ``Host`` header (``http://`` unless a trusted proxy said
otherwise), before the key was checked: a submission to ``/v1/cases/`` was told to send the image
again to whatever host the request named, where docs/API.md says dermq answers no request with a
redirect. The browser pages keep theirs (``/portal`` to ``/portal/``), to their own path only."""

from __future__ import annotations

import uuid

import pytest

from tests import support
from tests.api.test_cases import rows_for
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")

CASE = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/cases/"),
        ("GET", "/v1/cases/"),
        ("GET", f"/v1/cases/{CASE}/"),
        ("GET", f"/v1/cases/{CASE}/heatmap.png/"),
        ("GET", "/v1/clinic/callback/"),
        ("GET", "/v1/audit-events/"),
    ],
)
def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, settings, jpeg_bytes: bytes, method: str, path: str
) -> None:
    body, content_type = support.multipart(jpeg_bytes)
    answer = client.request(
        method,
        path,
        headers={**tenant.headers, "Host": "attacker.example", "Content-Type": content_type},
        content=body if method == "POST" else None,
        follow_redirects=False,
    )
    assert (answer.status_code, answer.json()["code"]) == (404, "not_found"), (answer.status_code, answer.text)
    assert answer.headers["content-type"] == "application/problem+json"
    assert "location" not in answer.headers
    assert rows_for(settings, tenant.clinic_id) == {"cases": 0, "blobs": 0, "case_events": 0}


@pytest.mark.parametrize("page", ["/portal", "/audit"])
def test_a_page_without_its_slash_is_sent_to_its_own_path(client, page: str) -> None:  # type: ignore[no-untyped-def]
    answer = client.get(page, headers={"Host": "attacker.example"}, follow_redirects=False)
    assert answer.status_code in (307, 308)
    assert answer.headers["location"] == f"{page}/"  # this origin's page, whatever the Host header said
    assert client.get(answer.headers["location"]).status_code == 200


def test_the_case_routes_still_answer_without_the_slash(client, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    missing = client.get(f"/v1/cases/{uuid.uuid4()}", headers=tenant.headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "case_not_found")
