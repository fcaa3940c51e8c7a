"""The API's access log names an authenticated request's key and clinic, by id: an operator told that
uploads are being refused (DermqUploadRejectionsHigh) finds which portal sends them. Never a name, a
token or anything the request carried."""

from __future__ import annotations

import json
import logging

import pytest

from core.logs import JsonFormatter
from tests.conftest import Tenant


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "http_request"]


def test_the_access_log_names_the_caller_by_id(client, tenant: Tenant, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="dermq.api.access")
    refused = client.post("/v1/cases", headers=tenant.headers, files={"image": ("x.txt", b"no image", "text/plain")})
    assert refused.status_code == 415, refused.text
    [record] = _access(caplog)
    line = json.loads(JsonFormatter("api").format(record))
    assert (line["route"], line["status_code"]) == ("/v1/cases", 415)
    assert (line["key_id"], line["clinic_id"]) == (str(tenant.key_id), str(tenant.clinic_id))
    assert tenant.token not in caplog.text
    caplog.clear()
    assert client.get("/v1/cases").status_code == 401  # no key: nobody to name
    [anonymous] = _access(caplog)
    assert "key_id" not in json.loads(JsonFormatter("api").format(anonymous))


def test_a_method_no_route_takes_counts_as_other(client) -> None:  # type: ignore[no-untyped-def]
    """Any token is an HTTP method: counted by name, each made a series of its own, without bound."""
    from api.metrics import REGISTRY

    def count(method: str) -> float:
        labels = {"route": "/v1/cases", "method": method, "status": "405"}
        return REGISTRY.get_sample_value("dermq_http_requests_total", labels) or 0.0

    before = count("other")
    assert client.request("PROPFIND", "/v1/cases").status_code == 405
    assert count("other") == before + 1 and count("PROPFIND") == 0
