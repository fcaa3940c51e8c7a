"""The case pipeline end to end: real HTTP intake, Postgres, Redis and a real Celery worker process."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select, text

from core.crypto import SealedBlob, decrypt_blob
from core.db import session_scope
from core.errors import DecryptionError
from core.models import AuditEvent, Case, CaseBlob
from ml.labels import CLASSES
from tests import support
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def submit(client, tenant: Tenant, image: bytes, **fields: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/cases", headers=tenant.headers, files={"image": ("lesion.jpg", image, "image/jpeg")}, data=fields
    )


def wait_done(client, tenant: Tenant, case_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        body = client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()
        return body if body["status"] in ("succeeded", "failed") else None

    return support.wait_for(finished, timeout=timeout, interval=0.2, what=f"case {case_id} to finish")


def rows_for(settings, clinic_id: uuid.UUID) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        cases = session.scalar(select(func.count()).select_from(Case).where(Case.clinic_id == clinic_id))
        blobs = session.scalar(select(func.count()).select_from(CaseBlob).join(Case).where(Case.clinic_id == clinic_id))
        events = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.clinic_id == clinic_id, AuditEvent.action.like("case.%"))
        )
    return {"cases": cases, "blobs": blobs, "case_events": events}


def test_a_real_image_is_classified_with_a_heat_map(client, worker, tenant: Tenant, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    image = fixture_images["ISIC_0024313"].read_bytes()
    response = submit(client, tenant, image, client_ref="MRN-0042", priority="urgent")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["priority"] == "urgent"
    assert response.headers["location"] == f"/v1/cases/{body['id']}"
    assert response.headers["cache-control"] == "no-store"

    done = wait_done(client, tenant, body["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["outcome"] == "diagnosis" and "ood_reasons" not in result
    assert list(result["probabilities"]) == list(CLASSES)
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-6
    assert result["label"] in CLASSES and result["confidence"] == result["probabilities"][result["label"]]
    assert 0 <= result["uncertainty"] <= 1 and isinstance(result["referral"], bool)
    assert result["gradcam_status"] == "ok" and result["model"]["id"] == settings.model
    assert len(result["model"]["weights_sha256"]) == 64 and result["device"] == "cpu"
    assert done["client_ref"] == "MRN-0042" and done["finished_at"] and done["attempts"] == 1

    heat = client.get(done["links"]["heatmap"], headers=tenant.headers)
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    assert heat.headers["cache-control"] == "no-store"
    assert Image.open(io.BytesIO(heat.content)).size == Image.open(io.BytesIO(image)).size

    with support.statements_sent(settings) as statements:  # a poll of a finished case: one read, audited
        again = client.get(f"/v1/cases/{body['id']}", headers=tenant.headers).json()
    assert again == done
    # the case, its result and its client reference in one round trip: the read's prepared statement
    # (PREPAREd first on a connection that had not run it yet)
    reads = [
        s
        for s in statements
        if s.startswith("EXECUTE") or (s.startswith("SELECT") and ("cases" in s or "results" in s))
    ]
    assert len(reads) == 1 and reads[0].startswith("EXECUTE"), reads
    assert any(s.startswith("INSERT INTO audit_events") for s in statements), statements


def test_clinics_are_isolated_and_keys_checked(client, worker, make_key, fixture_images) -> None:  # type: ignore[no-untyped-def]
    owner, other = make_key(), make_key()
    case_id = submit(client, owner, fixture_images["ISIC_0024311"].read_bytes()).json()["id"]
    for path in (f"/v1/cases/{case_id}", f"/v1/cases/{case_id}/heatmap.png"):
        response = client.get(path, headers=other.headers)
        assert response.status_code == 404 and response.json()["code"] == "case_not_found"
    assert client.get(f"/v1/cases/{uuid.uuid4()}", headers=other.headers).status_code == 404
    assert all(item["id"] != case_id for item in client.get("/v1/cases", headers=other.headers).json()["items"])
    assert client.delete(f"/v1/cases/{case_id}", headers=other.headers).status_code == 404

    for headers, code in (
        ({}, "missing_credentials"),
        ({"Authorization": "Bearer nonsense"}, "invalid_credentials"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_credentials"),
        ({"Authorization": owner.headers["Authorization"][:-2] + "xx"}, "invalid_credentials"),
    ):
        response = client.get(f"/v1/cases/{case_id}", headers=headers)
        assert response.status_code == 401 and response.json()["code"] == code
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"

    auditor = make_key("auditor")
    response = submit(client, auditor, fixture_images["ISIC_0024311"].read_bytes())
    assert response.status_code == 403 and response.json()["code"] == "role_not_allowed"
    assert client.get(f"/v1/cases/{case_id}", headers=auditor.headers).status_code == 403


@pytest.mark.parametrize(
    ("name", "expected_status", "expected_code"),
    [
        ("zero bytes", 422, "empty"),
        ("text", 415, "unsupported_format"),
        ("truncated", 422, "truncated"),
        ("corrupt", 422, "corrupt"),
        ("bomb", 422, "decompression_bomb"),
        ("tiny", 422, "too_small"),
    ],
)
def test_bad_images_are_refused_and_leave_nothing(
    client, tenant: Tenant, settings, jpeg_bytes: bytes, name: str, expected_status: int, expected_code: str
) -> None:  # type: ignore[no-untyped-def]
    from tests.ml.test_images import encode, png_declaring

    data = {
        "zero bytes": b"",
        "text": b"MRN 0042, Jane Doe, lesion on the left shoulder\n" * 3,
        "truncated": jpeg_bytes[: len(jpeg_bytes) // 2],
        "corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "bomb": png_declaring(30000, 30000),
        "tiny": encode(Image.new("RGB", (4, 4)), "PNG"),
    }[name]
    response = submit(client, tenant, data, client_ref="MRN-0042")
    assert response.status_code == expected_status, response.text
    problem = response.json()
    assert problem["code"] == expected_code and problem["status"] == expected_status
    assert problem["type"].endswith(expected_code) and problem["detail"] and "MRN" not in response.text
    assert rows_for(settings, tenant.clinic_id) == {"cases": 0, "blobs": 0, "case_events": 0}


def test_form_mistakes_are_clear_4xx(client, tenant: Tenant, jpeg_bytes: bytes, settings) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (dict(content=b"{}", headers={"Content-Type": "application/json"}), 415, "expected_multipart"),
        (dict(content=b"x"), 415, "missing_content_type"),
        (dict(files={"photo": ("a.jpg", jpeg_bytes, "image/jpeg")}), 422, "unexpected_field"),
        (
            dict(data={"client_ref": "x"}, files={"image": ("a.txt", jpeg_bytes, "text/plain")}),
            415,
            "unsupported_media_type",
        ),
        (
            dict(data={"priority": "asap"}, files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}),
            422,
            "invalid_priority",
        ),
        (
            dict(data={"client_ref": "x" * 500}, files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}),
            422,
            "invalid_client_ref",
        ),
    ]
    for kwargs, status, code in cases:
        headers = {**tenant.headers, **kwargs.pop("headers", {})}
        response = client.post("/v1/cases", headers=headers, **kwargs)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    body, content_type = support.multipart(fields={"client_ref": "x"})
    response = client.post("/v1/cases", headers={**tenant.headers, "Content-Type": content_type}, content=body)
    assert response.status_code == 422 and response.json()["code"] == "missing_image"
    assert rows_for(settings, tenant.clinic_id)["cases"] == 0


def test_oversized_body_is_refused_before_it_is_read(live_api: str, make_key) -> None:  # type: ignore[no-untyped-def]
    import socket
    from urllib.parse import urlparse

    tenant = make_key()
    host, port = urlparse(live_api).hostname, urlparse(live_api).port
    chunk, total_chunks = b"\0" * (256 * 1024), 400  # 100 MiB offered against a 1 MiB cap
    for declared in (True, False):
        with socket.create_connection((host, port), timeout=10) as sock:
            head = (
                f"POST /v1/cases HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {tenant.token}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
            )
            head += f"Content-Length: {len(chunk) * total_chunks}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
            sock.sendall((head + "\r\n").encode())
            preamble = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
            sock.sendall(preamble if declared else f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
            sent, reply = 0, b""
            sock.setblocking(False)
            for _ in range(total_chunks):
                with contextlib.suppress(BlockingIOError):
                    reply += sock.recv(65536)
                if reply:
                    break
                try:
                    data = chunk if declared else f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
                    sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.005)
            sock.setblocking(True)
            sock.settimeout(10)
            while b"\r\n\r\n" not in reply:
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert sent < len(chunk) * total_chunks / 10, f"the server read {sent} bytes before refusing"


def test_no_patient_data_in_redis_or_logs(
    client, worker, tenant: Tenant, fixture_images, redis_client, settings, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    marker = f"PATIENT-{uuid.uuid4().hex[:8]}"
    images = [fixture_images[k].read_bytes() for k in ("ISIC_0024319", "ISIC_0024370", "ISIC_0024403")]
    ids = [submit(client, tenant, image, client_ref=marker).json()["id"] for image in images * 2]
    seen_messages = 0
    snapshots: list[bytes] = []
    deadline, next_look = time.monotonic() + 120, 0.0
    while True:
        assert time.monotonic() < deadline, "the cases did not end within 120 s"
        for key in redis_client.scan_iter("*"):
            kind = redis_client.type(key)
            values: list[bytes] = [key]
            if kind == b"list":
                values += redis_client.lrange(key, 0, -1)
            elif kind == b"hash":
                values += [v for pair in redis_client.hgetall(key).items() for v in pair]
            elif kind == b"string":
                values.append(redis_client.get(key) or b"")
            elif kind == b"set":
                values += list(redis_client.smembers(key))
            elif kind == b"zset":
                values += redis_client.zrange(key, 0, -1)
            for value in values:
                snapshots.append(value)
                if b"dermq.classify" in value:
                    seen_messages += 1
                    envelope = json.loads(value)
                    envelope = envelope[0] if isinstance(envelope, list) else envelope  # unacked: [msg, ex, key]
                    snapshots.append(base64.b64decode(envelope["body"]))
        if time.monotonic() < next_look:  # Redis is scanned without a pause (a message lives milliseconds);
            continue  # the cases are read (each read audited) five times a second
        next_look = time.monotonic() + 0.2
        statuses = [client.get(f"/v1/cases/{i}", headers=tenant.headers).json()["status"] for i in ids]
        if all(s in ("succeeded", "failed") for s in statuses):
            break
    assert seen_messages, "no queued message was ever observed; the check looked in the wrong place"
    blob = b"\n".join(snapshots)
    assert marker.encode() not in blob
    assert all(image[200:264] not in blob for image in images)
    assert marker not in worker.output()
    assert marker not in caplog.text
    for image in images:
        assert image[200:264] not in worker.output().encode()


def test_stored_ciphertext_is_bound_to_its_case(client, tenant: Tenant, jpeg_bytes: bytes, settings, keyring) -> None:  # type: ignore[no-untyped-def]
    first = submit(client, tenant, jpeg_bytes).json()["id"]
    second = submit(client, tenant, jpeg_bytes).json()["id"]
    with session_scope(settings) as session:
        blob = session.scalar(select(CaseBlob).where(CaseBlob.case_id == uuid.UUID(first), CaseBlob.kind == "image"))
        sealed = SealedBlob(blob.ciphertext, blob.nonce, blob.wrapped_key, blob.kek_id)
    assert jpeg_bytes[:64] not in sealed.ciphertext and sealed.ciphertext != jpeg_bytes
    assert decrypt_blob(keyring, sealed, case_id=uuid.UUID(first), kind="image") == jpeg_bytes
    with pytest.raises(DecryptionError):
        decrypt_blob(keyring, sealed, case_id=uuid.UUID(second), kind="image")


def test_every_access_is_audited(client, worker, make_key, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    tenant, other = make_key(), make_key()
    case_id = submit(client, tenant, fixture_images["ISIC_0024412"].read_bytes()).json()["id"]
    wait_done(client, tenant, case_id)
    assert client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers).status_code == 200
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    assert client.get(f"/v1/cases/{case_id}", headers=other.headers).status_code == 404
    unknown_key = client.get("/v1/cases", headers={"Authorization": "Bearer dq_000000000000_" + "A" * 43})
    assert unknown_key.status_code == 401
    with session_scope(settings) as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == case_id).order_by(AuditEvent.id)
        ).all()
        actions = [(e.action, e.outcome) for e in events]
        assert ("case.create", "success") in actions and ("case.read", "success") in actions
        assert ("case.start", "success") in actions and ("case.classify", "success") in actions
        assert ("heatmap.read", "success") in actions
        denied = [e for e in events if e.outcome == "denied"]
        # the probe is seen by the prober's auditors and by the owning clinic's, with one reason for both
        assert {e.clinic_id for e in denied} == {other.clinic_id, tenant.clinic_id}
        assert all(e.actor_key_id == other.key_id and e.detail == {"reason": "not_found"} for e in denied)
        create = next(e for e in events if e.action == "case.create")
        assert create.actor_key_id == tenant.key_id and create.actor_role == "clinic"
        assert create.clinic_id == tenant.clinic_id and create.source_ip and create.request_id
        assert (
            session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == "case.list", AuditEvent.actor_key_id == tenant.key_id)
            )
            >= 1
        )
        # the unknown key's request, found by its own request id (other tests are denied in this database too)
        refused = session.scalars(
            select(AuditEvent).where(AuditEvent.request_id == unknown_key.headers["X-Request-ID"])
        ).all()
        assert [(e.action, e.outcome) for e in refused] == [("auth.denied", "denied")]
        raw = json.dumps(
            [
                str(
                    session.execute(
                        text("SELECT row_to_json(a) FROM audit_events a WHERE entity_id = :id"), {"id": case_id}
                    ).all()
                )
            ]
        )
    assert "ISIC" not in raw and "lesion.jpg" not in raw
    verify = subprocess.run(
        [*support.DERMQ, "audit", "verify"],
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        env={
            **__import__("os").environ,
            "DERMQ_DATABASE_URL": settings.database_url,
            "DERMQ_KEY_FILE": str(settings.key_file),
        },
    )
    assert verify.returncode == 0 and "intact" in verify.stdout


def test_listing_is_newest_first_and_paginated(client, tenant: Tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    ids = [submit(client, tenant, jpeg_bytes).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/cases", headers=tenant.headers, params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    forged = base64.urlsafe_b64encode(b'["2024-01-01T00:00:00", 5]').decode()  # valid JSON, not a case id
    # a time Python parses and Postgres refuses (an offset past 15:59): not a 503
    offset = base64.urlsafe_b64encode(f'["2026-01-01T00:00:00+20:00", "{uuid.uuid4()}"]'.encode()).decode()
    for cursor in ("garbage!", forged, offset, ""):  # an empty one was read as none: the first page again
        bad = client.get("/v1/cases", headers=tenant.headers, params={"cursor": cursor})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"
    assert client.get("/v1/cases", headers=tenant.headers, params={"status": "nonsense"}).status_code == 422


def test_health_readiness_and_docs(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}
    schema = client.get("/openapi.json").json()
    assert {"/v1/cases", "/v1/cases/{case_id}", "/v1/cases/{case_id}/heatmap.png", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    assert "multipart/form-data" in schema["paths"]["/v1/cases"]["post"]["requestBody"]["content"]
    # a client generated from the schema must know every success a submission answers: 201 with ?wait=
    assert {"200", "201", "202"} <= set(schema["paths"]["/v1/cases"]["post"]["responses"])
    assert client.get("/docs").status_code == 200
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_the_api_never_imports_torch() -> None:
    code = "import sys, api.app, api.routes.cases; sys.exit('torch' in sys.modules or 'worker' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(support.ROOT)).returncode == 0
