"""Transport security: uvicorn's own TLS with a self-signed certificate, HSTS only under TLS,
security headers, no-store on patient data, CORS closed unless configured, and the JSON routes' body cap."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests import processes, support

pytestmark = pytest.mark.usefixtures("database")


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    support.self_signed_certificate(cert, key)
    return cert, key


def test_uvicorn_serves_tls_with_hsts(stack_env, tmp_path: Path, tenant) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed(tmp_path)
    port = support.free_port()
    env = {**stack_env, "DERMQ_API_PORT": str(port), "DERMQ_TLS_CERTFILE": str(cert), "DERMQ_TLS_KEYFILE": str(key)}
    server = processes.Process("api-tls", [str(support.VENV_BIN / "dermq-api")], env, tmp_path / "api.log")
    context = ssl.create_default_context(cafile=str(cert))
    try:

        def up() -> bool:
            try:
                return httpx.get(f"https://localhost:{port}/healthz", verify=context, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        support.wait_for(lambda: up() or not server.alive(), timeout=60, what="the TLS API")
        assert server.alive(), server.output()[-2000:]
        response = httpx.get(f"https://localhost:{port}/v1/cases", headers=tenant.headers, verify=context)
        assert response.status_code == 200
        assert response.headers["strict-transport-security"].startswith("max-age=")
        assert response.headers["cache-control"] == "no-store"
        with (
            socket.create_connection(("localhost", port)) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            # the certificate served is the one DERMQ_TLS_CERTFILE names
            assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://localhost:{port}/healthz", timeout=3)  # no plaintext on the TLS port
    finally:
        server.stop()


def test_security_headers_and_cors(client, api_app, settings, tenant) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    response = client.get("/v1/cases", headers=tenant.headers)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "strict-transport-security" not in response.headers  # plain HTTP: no HSTS
    docs = client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    preflight = {"Origin": "https://portal.example", "Access-Control-Request-Method": "POST"}
    closed = client.options("/v1/cases", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = create_app(settings.model_copy(update={"cors_origins": ["https://portal.example"]}))
    with TestClient(opened) as http:
        allowed = http.options("/v1/cases", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://portal.example"
        other = http.options("/v1/cases", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # a browser portal reads the headers the API documents for clients, a replay's flag included
        listed = http.get("/v1/cases", headers={**tenant.headers, "Origin": "https://portal.example"})
        exposed = {h.strip().lower() for h in listed.headers["access-control-expose-headers"].split(",")}
        assert {"location", "retry-after", "x-request-id", "idempotent-replayed", "content-disposition"} <= exposed
        # every method a route takes: a portal on its own origin registers its callback (PUT), which the
        # browser's preflight refused
        for method, path in (("PUT", "/v1/clinic/callback"), ("DELETE", "/v1/clinic/callback"), ("GET", "/v1/cases")):
            asked = http.options(path, headers={**preflight, "Access-Control-Request-Method": method})
            assert asked.status_code == 200 and method in asked.headers["access-control-allow-methods"], method


def test_a_json_route_refuses_a_large_body_before_reading_it_or_authenticating(client, tenant) -> None:  # type: ignore[no-untyped-def]
    from api.middleware import MAX_JSON_BODY

    big = b'{"url": "https://portal.example.org/' + b"a" * MAX_JSON_BODY + b'"}'

    def chunks():  # no Content-Length: sent chunked, refused once the bytes pass the cap
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    for headers in (tenant.headers, {}):  # with a key, and without one: the size is refused first
        declared = client.put("/v1/clinic/callback", headers=headers, content=big)
        streamed = client.put("/v1/clinic/callback", headers=headers, content=chunks())
        for refused in (declared, streamed):
            assert refused.status_code == 413, refused.text
            assert refused.json()["code"] == "payload_too_large" and refused.headers["x-request-id"]
            assert refused.json()["instance"] == "/v1/clinic/callback"  # RFC 9457: a string, never null
    ok = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": "https://portal.example.org/hook"})
    assert ok.status_code == 200, ok.text  # a small body still reaches the route


def test_a_request_id_is_kept_only_when_it_cannot_carry_an_identifier(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A portal's own request id is kept for correlation when it is 32 hex digits or a UUID; free text
    (a record number, a name, a line break) would go into the logs and the audit trail, and is
    replaced by a fresh id."""
    kept = ["0123456789abcdef0123456789ABCDEF", "6f1c2a7e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"]
    for supplied in kept:
        response = client.get("/v1/cases", headers={**tenant.headers, "X-Request-ID": supplied})
        assert response.status_code == 200 and response.headers["x-request-id"] == supplied
    for supplied in ["MRN-00123456", "jane.doe.1970-01-01", "0123456789abcdef0123456789abcdef\n", "12345678"]:
        response = client.get("/v1/cases/not-a-case", headers={**tenant.headers, "X-Request-ID": supplied})
        fresh = response.headers["x-request-id"]
        assert fresh != supplied.strip() and len(fresh) == 32 and response.json()["request_id"] == fresh


OUTCOME = {"diagnosis": "nv", "method": "follow_up"}


@pytest.fixture(scope="module")
def patient_answers(client, worker, settings, keyring, fixture_images) -> dict[str, tuple[str, str, dict]]:  # type: ignore[no-untyped-def]
    """A clinic with a succeeded case and a callback, an auditor and a sealed audit log: each route that
    answers with patient data (or proves the events about it) as (method, path, request options)."""
    from core.db import session_scope
    from core.models import AuditEvent
    from tests.api.test_cases import submit, wait_done
    from tests.conftest import new_tenant

    clinic, auditor = new_tenant(settings, keyring), new_tenant(settings, keyring, "auditor")
    case_id = submit(client, clinic, fixture_images["ISIC_0024313"].read_bytes()).json()["id"]
    assert wait_done(client, clinic, case_id)["status"] == "succeeded"
    hook = client.put("/v1/clinic/callback", headers=clinic.headers, json={"url": "https://portal.example.org/hook"})
    assert hook.status_code == 200, hook.text
    with session_scope(settings) as session:
        event = session.scalar(select(AuditEvent.id).where(AuditEvent.entity_id == case_id).limit(1))
    size = support.seal_all(settings).size
    return {
        "fhir": ("GET", f"/v1/cases/{case_id}/fhir", {"headers": clinic.headers}),
        "outcome": ("POST", f"/v1/cases/{case_id}/outcome", {"headers": clinic.headers, "json": OUTCOME}),
        "callback": ("GET", "/v1/clinic/callback", {"headers": clinic.headers}),
        "checkpoint": ("GET", "/v1/audit/checkpoints/latest", {"headers": auditor.headers}),
        "inclusion": ("GET", "/v1/audit/proofs/inclusion", {"headers": auditor.headers, "params": {"event": event}}),
        "consistency": (
            "GET",
            "/v1/audit/proofs/consistency",
            {"headers": auditor.headers, "params": {"from": 1, "to": size}},
        ),
    }


@pytest.mark.parametrize("route", ["fhir", "outcome", "callback", "checkpoint", "inclusion", "consistency"])
def test_answers_with_patient_data_are_never_stored(client, patient_answers, route: str) -> None:  # type: ignore[no-untyped-def]
    """``Cache-Control: no-store`` on every answer that carries patient data (a browser's or a proxy's
    cache would keep it on disk): asserted before on the case list and the latest checkpoint only."""
    method, path, options = patient_answers[route]
    response = client.request(method, path, **options)
    assert response.status_code in (200, 201), response.text
    assert response.headers["cache-control"] == "no-store"
