"""Every problem code the API and the services under it can answer with is in docs/API.md, so that a
portal's developer can look up any ``code`` dermq sends."""

from __future__ import annotations

import re

from tests.support import ROOT

#: Codes the API never sends: the operators' CLI's (period keys, database grants) and a worker's failure reason.
NOT_SENT_BY_THE_API = {
    "not_owner",
    "not_migrated",
    "role_not_found",
    "runtime_is_owner",
    "invalid_period",
    "unknown_period",
    "period_not_ended",
    "period_has_live_cases",
    "image_missing",
}
CODE = re.compile(r"""\bcode\s*=\s*"([a-z_]+)"|InvalidImage\(\s*"([a-z_]+)"|code, title = \d+, "([a-z_]+)\"""")


def _codes_raised() -> set[str]:
    found: set[str] = set()
    for package in ("api", "core", "ml"):
        for path in (ROOT / package).rglob("*.py"):
            for match in CODE.finditer(path.read_text(encoding="utf-8")):
                found.add(next(group for group in match.groups() if group))
    return found


def test_every_problem_code_the_api_can_send_is_documented() -> None:
    raised = _codes_raised()
    assert {"case_not_found", "truncated", "rate_limited", "too_many_parts"} <= raised, "the scan finds codes"
    documented = set(re.findall(r"`([a-z_]+)`", (ROOT / "docs" / "API.md").read_text(encoding="utf-8")))
    missing = raised - documented - NOT_SENT_BY_THE_API
    assert not missing, f"document these codes in docs/API.md, 'Errors': {sorted(missing)}"


def test_an_unexpected_error_is_a_500_with_the_requests_id_and_headers(settings, database, redis_client) -> None:  # type: ignore[no-untyped-def]
    # Starlette's outermost handler answered it after the request context had ended: "request_id":
    # null in a body that says to quote it, and no X-Request-ID or security headers on the answer.
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings)

    def broken() -> None:  # any defect in a route, here one of this test's own
        raise RuntimeError("a defect")

    app.add_api_route("/broken", broken)
    trace = "0123456789abcdef0123456789abcdef"
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/broken", headers={"X-Request-ID": trace})
    assert answer.status_code == 500 and answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "internal_error" and answer.json()["request_id"] == trace
    assert answer.headers["x-request-id"] == trace
    assert {"content-security-policy", "x-content-type-options"} <= set(answer.headers)
    assert "a defect" not in answer.text
