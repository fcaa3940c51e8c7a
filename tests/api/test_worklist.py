"""A clinic's worklist: filters by priority and date, each finished case's label and referral flag
in the list, unknown parameters refused, and an idempotent replay that would drop what was sent refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from tests.conftest import Tenant


def submit(client, tenant: Tenant, data: bytes, **fields: str):  # type: ignore[no-untyped-def]
    headers = dict(tenant.headers)
    if "key" in fields:
        headers["Idempotency-Key"] = fields.pop("key")
    return client.post("/v1/cases", headers=headers, files={"image": ("l.jpg", data, "image/jpeg")}, data=fields)


def test_the_list_filters_and_shows_each_finished_cases_label(client, worker, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    urgent = submit(client, tenant, jpeg_bytes, priority="urgent").json()["id"]
    routine = submit(client, tenant, jpeg_bytes).json()["id"]
    done = client.get(f"/v1/cases/{urgent}?wait=30", headers=tenant.headers).json()
    assert done["status"] == "succeeded"
    rows = client.get("/v1/cases?priority=urgent", headers=tenant.headers).json()["items"]
    assert [r["id"] for r in rows] == [urgent]
    assert rows[0]["outcome"] == done["result"]["outcome"]
    assert (rows[0]["label"], rows[0]["referral"]) == (done["result"].get("label"), done["result"].get("referral"))
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert client.get("/v1/cases", headers=tenant.headers, params={"since": later}).json()["items"] == []
    everything = client.get("/v1/cases", headers=tenant.headers, params={"until": later}).json()["items"]
    assert {r["id"] for r in everything} >= {urgent, routine}


def test_an_unknown_query_parameter_is_a_422_not_an_unfiltered_list(client, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    answer = client.get("/v1/cases?stauts=failed", headers=tenant.headers)
    assert answer.status_code == 422 and answer.json()["code"] == "unknown_parameter"
    assert "stauts" in answer.json()["detail"]
    # nor a parameter ignored some other way: a second one, an empty range, a misspelt wait on a case
    twice = client.get("/v1/cases?status=failed&status=queued", headers=tenant.headers)
    assert (twice.status_code, twice.json()["code"]) == (422, "repeated_parameter"), twice.text
    backwards = {"since": "2027-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
    empty = client.get("/v1/cases", headers=tenant.headers, params=backwards)
    assert (empty.status_code, empty.json()["code"]) == (400, "invalid_time_range"), empty.text
    misspelt = client.get(f"/v1/cases/{uuid.uuid4()}?wiat=20", headers=tenant.headers)
    assert (misspelt.status_code, misspelt.json()["code"]) == (422, "unknown_parameter"), misspelt.text


def test_a_replay_that_would_drop_a_new_client_ref_or_priority_is_refused(client, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    key = f"visit-{uuid.uuid4().hex}"
    assert submit(client, tenant, jpeg_bytes, key=key, client_ref="MRN-1").status_code == 202
    assert submit(client, tenant, jpeg_bytes, key=key, client_ref="MRN-1").status_code == 200
    other_ref = submit(client, tenant, jpeg_bytes, key=key, client_ref="MRN-2")
    assert other_ref.status_code == 409 and "client_ref" in other_ref.json()["detail"]
    other_priority = submit(client, tenant, jpeg_bytes, key=key, client_ref="MRN-1", priority="urgent")
    assert other_priority.status_code == 409 and "priority" in other_priority.json()["detail"]


def test_refusals_name_the_role_and_the_field_in_plain_english(client, make_key, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    refused = client.get("/v1/cases", headers=auditor.headers)
    assert refused.status_code == 403 and refused.json()["detail"].startswith("an auditor key cannot do this")
    odd = client.post(
        "/v1/cases", headers=tenant.headers, files={"image": ("l.jpg", jpeg_bytes, "image/jpeg")}, data={"note": "x"}
    )
    assert odd.status_code == 422 and "'note'" in odd.json()["detail"]


def test_a_date_no_clock_can_show_is_a_400_not_a_500(client, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    for since in ("6174-07-10T21:48:51.37-19:51", "9999-12-31T23:00:00-05:00"):  # found by the conformance test
        answer = client.get("/v1/cases", headers=tenant.headers, params={"since": since})
        assert answer.status_code == 400 and answer.json()["code"] == "invalid_time_range", answer.text
