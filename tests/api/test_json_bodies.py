"""Operations that take a JSON body and get another media type answer 415 ``unsupported_media_type``,
telling the caller to send application/json; FastAPI alone validated the raw bytes and answered 422
about a field the caller had sent. Nothing is created. An unauthenticated caller still gets 401 first."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import ApiKey, Clinic, ClinicCallback

pytestmark = pytest.mark.usefixtures("database")


def counts(settings) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (Clinic, ApiKey, ClinicCallback))  # type: ignore[return-value]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/+json", None])
def test_a_json_body_sent_as_another_media_type_is_refused_with_415(  # type: ignore[no-untyped-def]
    client, make_key, tenant, settings, content_type: str | None
) -> None:
    admin = make_key("admin")
    sent = [
        ("post", "/v1/admin/clinics", admin.headers, {"name": f"south-{uuid.uuid4().hex[:6]}"}),
        ("post", "/v1/admin/keys", admin.headers, {"role": "auditor"}),
        ("put", "/v1/clinic/callback", tenant.headers, {"url": "https://portal.example/hook"}),
        ("post", f"/v1/cases/{uuid.uuid4()}/outcome", tenant.headers, {"diagnosis": "nv", "method": "histo"}),
    ]
    before = counts(settings)
    for method, path, headers, body in sent:
        typed = {**headers, **({"Content-Type": content_type} if content_type else {})}
        answer = client.request(method, path, headers=typed, content=json.dumps(body).encode())
        assert answer.status_code == 415, (path, answer.text)
        problem = answer.json()
        assert problem["code"] == "unsupported_media_type" and "application/json" in problem["detail"], problem
        assert answer.headers["content-type"] == "application/problem+json"
        unauthenticated = client.request(method, path, headers={"Content-Type": "text/plain"}, content=b"{}")
        assert unauthenticated.status_code == 401, path
    assert counts(settings) == before


def test_json_with_a_charset_or_a_json_suffix_is_taken(client, make_key) -> None:  # type: ignore[no-untyped-def]
    admin = make_key("admin")
    for content_type in ("application/json; charset=utf-8", "application/vnd.dermq+json"):
        body = json.dumps({"name": f"east-{uuid.uuid4().hex[:6]}"}).encode()
        answer = client.post("/v1/admin/clinics", headers={**admin.headers, "Content-Type": content_type}, content=body)
        assert answer.status_code == 201, answer.text


def test_a_json_object_that_names_a_member_twice_is_refused_and_changes_nothing(  # type: ignore[no-untyped-def]
    client, make_key, tenant, settings
) -> None:
    admin = make_key("admin")
    json_typed = {"Content-Type": "application/json"}
    sent = [  # the sender may mean either value: which one a parser keeps is not the JSON standard's
        ("post", "/v1/admin/clinics", admin.headers, b'{"name": "west-a", "name": "west-b"}'),
        ("post", "/v1/admin/keys", admin.headers, b'{"role": "auditor", "label": "x", "role": "admin"}'),
        ("put", "/v1/clinic/callback", tenant.headers, b'{"url": "https://a.example/h", "url": "https://b.example/h"}'),
        (
            "post",
            f"/v1/cases/{uuid.uuid4()}/outcome",
            tenant.headers,
            b'{"diagnosis": "nv", "method": "histo", "diagnosis": "mel"}',
        ),
    ]
    before = counts(settings)
    for method, path, headers, body in sent:
        answer = client.request(method, path, headers={**headers, **json_typed}, content=body)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["code"] == "duplicate_key" and "twice" in answer.json()["detail"], answer.json()
    assert counts(settings) == before


def test_a_json_body_nested_too_deeply_is_a_400_at_every_depth(client, make_key) -> None:  # type: ignore[no-untyped-def]
    # FastAPI parses the body first and answers 400 past Python's recursion limit; the duplicate-member
    # check parsed it again a few frames deeper, and in the band between the two the answer was a 500.
    tenant = make_key()
    json_typed = {**tenant.headers, "Content-Type": "application/json"}

    def answer(depth: int) -> int:
        sent = client.put("/v1/clinic/callback", headers=json_typed, content=b"[" * depth + b"]" * depth)
        assert sent.headers["content-type"].startswith("application/problem+json"), (depth, sent.text)
        return sent.status_code

    shallow, deep = 10, 30_000  # a list, not an object: 422; far past the recursion limit (60 KB): 400
    assert (answer(shallow), answer(deep)) == (422, 400)
    while deep - shallow > 1:  # the first depth that is not a 422
        middle = (shallow + deep) // 2
        shallow, deep = (middle, deep) if answer(middle) == 422 else (shallow, middle)
    assert {answer(depth) for depth in range(deep, deep + 8)} == {400}


def test_a_json_body_in_utf_16_or_utf_32_or_another_charset_is_refused_and_changes_nothing(  # type: ignore[no-untyped-def]
    client, make_key, settings
) -> None:
    """FastAPI's parse guesses UTF-16 and UTF-32 from the bytes (and skips a UTF-8 byte-order mark), so
    such a body created a clinic; RFC 8259 makes JSON between systems UTF-8."""
    admin = make_key("admin")
    json_typed = {**admin.headers, "Content-Type": "application/json"}
    text = json.dumps({"name": f"west-{uuid.uuid4().hex[:6]}"})
    before = counts(settings)
    for body in (text.encode("utf-16"), text.encode("utf-32"), text.encode("utf-16-le"), text.encode("utf-8-sig")):
        answer = client.post("/v1/admin/clinics", headers=json_typed, content=body)
        assert (answer.status_code, answer.json()["code"]) == (400, "bad_request"), answer.text
        assert "UTF-8" in answer.json()["detail"]
    labelled = {**admin.headers, "Content-Type": 'application/json; charset="UTF-16"'}
    answer = client.post("/v1/admin/clinics", headers=labelled, content=text.encode("utf-16"))
    assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type"), answer.text
    assert counts(settings) == before


def test_an_operation_that_changes_data_refuses_a_query_parameter_it_does_not_take(  # type: ignore[no-untyped-def]
    client, make_key, tenant, settings, jpeg_bytes
) -> None:
    """They ignored any: ``DELETE /v1/cases/{id}?dry_run=true`` erased the case for good."""
    admin = make_key("admin")
    submitted = client.post("/v1/cases", headers=tenant.headers, files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")})
    assert submitted.status_code == 202, submitted.text
    case_id = submitted.json()["id"]
    sent = [
        ("post", "/v1/admin/clinics?dry_run=true", admin.headers, {"name": f"north-{uuid.uuid4().hex[:6]}"}),
        ("post", "/v1/admin/keys?dry_run=true", admin.headers, {"role": "auditor"}),
        ("post", f"/v1/admin/keys/{admin.key_id}/revoke?dry_run=true", admin.headers, None),
        ("post", f"/v1/admin/clinics/{tenant.clinic_id}/deactivate?confirm=false", admin.headers, None),
        ("put", "/v1/clinic/callback?dry_run=true", tenant.headers, {"url": "https://portal.example/hook"}),
        ("delete", "/v1/clinic/callback?dry_run=true", tenant.headers, None),
        ("delete", f"/v1/cases/{case_id}?dry_run=true", tenant.headers, None),
    ]
    before = counts(settings)
    for method, path, headers, body in sent:
        typed = {**headers, "Content-Type": "application/json"}
        answer = client.request(method, path, headers=typed, content=None if body is None else json.dumps(body))
        assert (answer.status_code, answer.json()["code"]) == (422, "unknown_parameter"), (path, answer.text)
    assert counts(settings) == before
    case = client.get(f"/v1/cases/{case_id}", headers=tenant.headers)  # the clinic and its key still work
    assert case.status_code == 200 and case.json()["status"] != "purged", case.text
