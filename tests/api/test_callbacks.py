"""Completion callbacks: registration by the clinic's own key (the URL rules: test_callback_urls.py),
the secret sealed at rest, and signed, audited, retried delivery to a real receiver on 127.0.0.1 by
the real worker, which holds no row lock and no transaction while the receiver takes its time."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from select import select as readable

import pytest
from sqlalchemy import select, text

from core.callback_signing import verify
from core.db import get_engine, session_scope
from core.models import AuditEvent, CallbackDelivery, ClinicCallback
from tests import support
from tests.conftest import Tenant


def _hung_up(connection: socket.socket) -> bool:
    """The client closed a connection whose request has been read (it waits for no answer now)."""
    ready, _, _ = readable([connection], [], [], 0)
    try:
        return bool(ready) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Receiver:
    """A clinic's callback endpoint: answers with the next status of ``statuses`` (then 204). With
    ``hold``, each request waits until ``release()`` before it answers (a slow portal)."""

    def __init__(self, statuses: list[int], *, hold: bool = False) -> None:
        self.statuses = list(statuses)
        self.calls: list[dict[str, object]] = []
        self.open = self.most_open = 0  # requests being answered, now and at most at once
        self._count = threading.Lock()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver._count:
                    receiver.open += 1
                    receiver.most_open = max(receiver.most_open, receiver.open)
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    deadline = time.monotonic() + 30
                    while not receiver.released.wait(0.05) and time.monotonic() < deadline:
                        if _hung_up(self.connection):  # dermq gave up on this attempt: it is not open
                            return
                    self.send_response(receiver.statuses.pop(0) if receiver.statuses else 204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with receiver._count:
                        receiver.open -= 1

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dermq/hook?clinic=7"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500])
    yield server
    server.close()


# --------------------------------------------------------------------------- registration


@pytest.mark.usefixtures("database")
def test_a_clinic_registers_reads_rotates_and_removes_its_callback(client, tenant: Tenant, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    response = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    first = response.json()
    assert first["url"] == "http://127.0.0.1:9/hook" and first["secret"].startswith("whsec_")
    assert first["signature_header"] == "Dermq-Signature"

    shown = client.get("/v1/clinic/callback", headers=tenant.headers)
    assert shown.status_code == 200 and "secret" not in shown.json()

    with session_scope(settings) as session:  # sealed at rest: no trace of the secret in the row
        row = session.get(ClinicCallback, tenant.clinic_id)
        stored = b"".join([row.secret_ciphertext, row.secret_nonce, row.secret_wrapped_key, row.url.encode()])
        assert first["secret"].encode() not in stored and first["secret"][6:].encode() not in stored

    assert first["previous_secret_valid_until"] is None
    rotated = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": "http://127.0.0.1:9/v2"}).json()
    assert rotated["secret"] != first["secret"] and rotated["created_at"] == first["created_at"]
    # the secret it replaced signs beside it for a day (DERMQ_CALLBACK_SECRET_OVERLAP_HOURS), sealed too
    until = datetime.fromisoformat(rotated["previous_secret_valid_until"])
    assert timedelta(hours=23, minutes=59) < until - datetime.now(UTC) <= timedelta(hours=24)
    assert (
        client.get("/v1/clinic/callback", headers=tenant.headers).json()["previous_secret_valid_until"]
        == (rotated["previous_secret_valid_until"])
    )
    with session_scope(settings) as session:
        row = session.get(ClinicCallback, tenant.clinic_id)
        assert row.previous_secret_ciphertext is not None and first["secret"][6:].encode() not in b"".join(
            [row.previous_secret_ciphertext, row.previous_secret_nonce, row.secret_ciphertext]
        )
    # the receiver has the new secret: the old one stops signing now
    assert client.delete("/v1/clinic/callback/previous-secret", headers=tenant.headers).status_code == 204
    assert client.get("/v1/clinic/callback", headers=tenant.headers).json()["previous_secret_valid_until"] is None
    with session_scope(settings) as session:
        assert session.get(ClinicCallback, tenant.clinic_id).previous_secret_ciphertext is None  # type: ignore[union-attr]
    assert client.delete("/v1/clinic/callback/previous-secret", headers=tenant.headers).status_code == 204  # again

    other = make_key()  # another clinic neither sees nor removes it
    assert client.get("/v1/clinic/callback", headers=other.headers).status_code == 404
    assert client.delete("/v1/clinic/callback", headers=other.headers).status_code == 404
    auditor = make_key("auditor")
    assert (
        client.put("/v1/clinic/callback", headers=auditor.headers, json={"url": "http://127.0.0.1/"}).status_code == 403
    )

    assert client.delete("/v1/clinic/callback", headers=tenant.headers).status_code == 204
    gone = client.get("/v1/clinic/callback", headers=tenant.headers)
    assert gone.status_code == 404 and gone.json()["code"] == "callback_not_registered"

    with session_scope(settings) as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.clinic_id == tenant.clinic_id, AuditEvent.action.like("callback.%"))
            .order_by(AuditEvent.id)
        ).all()
    assert [e.action for e in events] == [
        "callback.register",
        "callback.read",  # the answer lists the clinic's cases whose deliveries failed
        "callback.register",
        "callback.read",
        "callback.end_overlap",
        "callback.read",
        "callback.end_overlap",
        "callback.unregister",
    ]
    # where the news goes, for an auditor (the host only: a path or query may hold the receiver's token),
    # and on a rotation until when the replaced secret signs
    assert events[0].detail == {"scheme": "http", "host": "127.0.0.1"}
    assert events[2].detail == {
        "scheme": "http",
        "host": "127.0.0.1",
        "rotated": True,
        "previous_signs_until": rotated["previous_secret_valid_until"].replace("Z", "+00:00"),
    }
    assert [events[4].detail, events[6].detail] == [{"ended": True}, {"ended": False}]
    assert all(first["secret"] not in json.dumps(e.detail) for e in events)


@pytest.mark.usefixtures("database")
def test_invalid_urls_are_refused_with_a_problem(client, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    for url in ("ftp://127.0.0.1/hook", "http://user:pw@127.0.0.1/hook", "http://127.0.0.1/" + "a" * 3000):
        response = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": url})
        assert response.status_code == 422 and response.json()["code"] in ("invalid_callback_url", "invalid_input")


# --------------------------------------------------------------------------- delivery by the worker


def deliveries(settings, case_id: uuid.UUID) -> tuple[CallbackDelivery | None, list[AuditEvent]]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        row = session.get(CallbackDelivery, case_id)
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "callback.deliver")
            .order_by(AuditEvent.id)
        ).all()
    return row, list(events)


@pytest.mark.usefixtures("database")
def test_a_finished_case_is_announced_signed_retried_and_audited(
    client, worker, callback_worker, tenant: Tenant, settings, receiver: Receiver, fixture_images
) -> None:  # type: ignore[no-untyped-def]
    secret = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": receiver.url}).json()["secret"]
    image = fixture_images["ISIC_0024311"].read_bytes()
    submitted = client.post(
        "/v1/cases",
        headers=tenant.headers,
        files={"image": ("lesion.jpg", image, "image/jpeg")},
        data={"client_ref": "MRN-0042 Jane Doe"},
    )
    case_id = uuid.UUID(submitted.json()["id"])
    row = support.wait_for(
        lambda: (d := deliveries(settings, case_id)[0]) is not None and d.status != "pending" and d,
        timeout=120,
        interval=0.2,
        what="the callback to be delivered",
    )
    assert (row.status, row.attempts, row.last_http_status) == ("delivered", 2, 204)

    assert len(receiver.calls) == 2  # a 500 first, then accepted after a backoff
    call = receiver.calls[-1]
    headers, body = call["headers"], call["body"]
    assert call["path"] == "/dermq/hook?clinic=7"
    assert verify(secret, headers["Dermq-Signature"], body)  # type: ignore[index, arg-type]
    notice = json.loads(body)  # type: ignore[arg-type]
    assert set(notice) == {"type", "case_id", "status", "outcome", "timestamp"}
    assert notice["case_id"] == str(case_id) and notice["status"] == "succeeded" and notice["type"] == "case.finished"
    assert notice["outcome"] == "diagnosis"
    assert headers["Dermq-Event-Id"] == str(case_id) and headers["Content-Type"] == "application/json"  # type: ignore[index]
    assert b"MRN" not in body and b"probabilit" not in body  # type: ignore[operator]
    assert receiver.calls[0]["body"] == body  # the retry sends the same notice

    _, events = deliveries(settings, case_id)
    assert [(e.outcome, e.detail) for e in events] == [
        ("failure", {"attempt": 1, "http_status": 500, "host": "127.0.0.1"}),
        ("success", {"attempt": 2, "http_status": 204, "host": "127.0.0.1"}),
    ]
    assert secret not in worker.output() and secret not in callback_worker.output()
    polled = client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()
    assert polled["status"] == "succeeded" and polled["client_ref"] == "MRN-0042 Jane Doe"
    # the clinic sees how its deliveries fare, and how long dermq keeps trying
    status = client.get("/v1/clinic/callback", headers=tenant.headers).json()
    assert status["deliveries_last_24h"] == {"delivered": 1} and status["recent_problems"] == []
    assert "attempts" in status["retries"]


@pytest.mark.usefixtures("database")
def test_after_a_rotation_both_secrets_sign_until_the_overlap_ends(
    client, worker, callback_worker, tenant: Tenant, settings, store_case, publisher, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    # A portal cannot take a new secret at the very moment dermq starts signing with it: the old one
    # keeps signing beside it, so the portal's check passes with either while its configuration changes.
    server = Receiver([])
    try:
        old = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).json()["secret"]
        new = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).json()["secret"]
        case_id = store_case(tenant, jpeg_bytes)
        support.publish_classify(publisher, case_id, "routine")
        support.wait_for(lambda: server.calls, timeout=120, what="the callback")
        header, body = server.calls[0]["headers"]["Dermq-Signature"], server.calls[0]["body"]  # type: ignore[index]
        assert verify(old, header, body) and verify(new, header, body)  # type: ignore[arg-type]
        assert not verify("whsec_" + "x" * 43, header, body)  # type: ignore[arg-type]
        # the previous secret's value first, the current one's last: a receiver that reads only the last
        # v1 checks the new secret
        stamp, *values = header.split(",")  # type: ignore[union-attr]
        assert (
            len(values) == 2 and verify(old, f"{stamp},{values[0]}", body) and verify(new, f"{stamp},{values[1]}", body)
        )  # type: ignore[arg-type]
        # once the overlap has ended, the new secret alone signs
        with session_scope(settings) as session:
            row = session.get(ClinicCallback, tenant.clinic_id)
            row.previous_secret_until = datetime.now(UTC) - timedelta(seconds=1)
        later = store_case(tenant, jpeg_bytes)
        support.publish_classify(publisher, later, "routine")
        support.wait_for(lambda: len(server.calls) >= 2, timeout=120, what="the second callback")
        header, body = server.calls[1]["headers"]["Dermq-Signature"], server.calls[1]["body"]  # type: ignore[index]
        assert header.count("v1=") == 1 and verify(new, header, body) and not verify(old, header, body)  # type: ignore[union-attr, arg-type]
        assert client.get("/v1/clinic/callback", headers=tenant.headers).json()["previous_secret_valid_until"] is None
    finally:
        server.close()


@pytest.mark.usefixtures("database")
def test_a_failed_case_is_announced_too(
    client, worker, callback_worker, tenant: Tenant, settings, store_case, publisher, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    server = Receiver([])
    try:
        secret = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).json()["secret"]
        case_id = store_case(tenant, jpeg_bytes[: len(jpeg_bytes) // 3])
        support.publish_classify(publisher, case_id, "routine")
        support.wait_for(lambda: server.calls, timeout=120, what="the callback of the failed case")
        notice = json.loads(server.calls[0]["body"])  # type: ignore[arg-type]
        assert notice["status"] == "failed" and notice["case_id"] == str(case_id) and notice["outcome"] is None
        assert verify(secret, server.calls[0]["headers"]["Dermq-Signature"], server.calls[0]["body"])  # type: ignore[index, arg-type]
        # The receiver saw the call before it answered: wait for the worker to record the answer.
        row = support.wait_for(
            lambda: (d := deliveries(settings, case_id)[0]) is not None and d.status != "pending" and d,
            timeout=30,
            interval=0.1,
            what="the delivery to be recorded",
        )
        assert (row.status, row.attempts) == ("delivered", 1)
        assert [e.outcome for e in deliveries(settings, case_id)[1]] == ["success"]
    finally:
        server.close()


@pytest.mark.usefixtures("database")
def test_a_slow_portal_holds_no_row_lock_and_no_transaction(
    client, worker, callback_worker, tenant: Tenant, settings, store_case, publisher, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    server = Receiver([], hold=True)
    try:
        client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).raise_for_status()
        case_id = store_case(tenant, jpeg_bytes)
        support.publish_classify(publisher, case_id, "urgent")
        support.wait_for(lambda: server.calls, timeout=120, what="the worker to post the callback")
        # The worker now waits on the portal's answer (for at most callback_timeout_seconds).
        with get_engine(settings).connect() as connection:
            with connection.begin():  # the outbox row is not locked: this would fail at once if it were
                row = connection.execute(
                    text(
                        "SELECT attempts, leased_until > now() AS leased FROM callback_deliveries"
                        " WHERE case_id = :id FOR UPDATE NOWAIT"
                    ),
                    {"id": case_id},
                ).one()
            assert (row.attempts, row.leased) == (1, True)  # the attempt is counted and leased
            stuck = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'dermq' AND state LIKE 'idle in transaction%'"
                    " AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            assert stuck == 0  # no dermq connection sits in a transaction while the portal thinks
        server.release()
        delivered = support.wait_for(
            lambda: (d := deliveries(settings, case_id)[0]) is not None and d.status != "pending" and d,
            timeout=60,
            interval=0.2,
            what="the callback to be recorded",
        )
        assert (delivered.status, delivered.attempts, delivered.last_http_status) == ("delivered", 1, 204)
        assert delivered.leased_until is None
        assert [(e.outcome, e.detail) for e in deliveries(settings, case_id)[1]] == [
            ("success", {"attempt": 1, "http_status": 204, "host": "127.0.0.1"})
        ]
    finally:
        server.close()


@pytest.mark.usefixtures("database")
def test_the_callback_status_shows_deliveries_that_failed(client, tenant: Tenant, settings, store_case) -> None:  # type: ignore[no-untyped-def]
    assert (
        client.put(
            "/v1/clinic/callback", headers=tenant.headers, json={"url": "https://portal.example-clinic.org/h"}
        ).status_code
        == 200
    )
    case_id = store_case(tenant, b"a case whose callback failed")
    with session_scope(settings) as session:
        session.add(
            CallbackDelivery(
                case_id=case_id,
                clinic_id=tenant.clinic_id,
                status="failed",
                attempts=8,
                last_http_status=503,
                last_error="http_status",
            )
        )
    status = client.get("/v1/clinic/callback", headers=tenant.headers).json()
    assert status["deliveries_last_24h"] == {"failed": 1}
    (problem,) = status["recent_problems"]
    assert (problem["case_id"], problem["attempts"], problem["last_http_status"]) == (str(case_id), 8, 503)
    assert problem["last_error"] == "http_status"
