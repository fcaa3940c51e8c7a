"""The auditor API: filtered, paginated, exportable, verifiable; scoped; itself audited; and
"no audit, no access"."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, select, text

from core import audit
from core.db import session_scope
from core.models import AuditEvent, Case
from tests import support
from tests.conftest import Tenant
from tests.support import seal_all
from tests.worker.test_tasks import wait_terminal
from worker.sealing import check as _check

pytestmark = pytest.mark.usefixtures("database")


def recent() -> dict[str, str]:
    """An export's required time range: the last hour (and a minute ahead, for clock skew)."""
    now = datetime.now(UTC)
    return {"since": (now - timedelta(hours=1)).isoformat(), "until": (now + timedelta(minutes=1)).isoformat()}


def check(settings):  # type: ignore[no-untyped-def]
    from core.checkpoint import load_signing_keys

    return _check(settings, load_signing_keys(settings))


def submit(client, tenant: Tenant, image: bytes) -> str:  # type: ignore[no-untyped-def]
    response = client.post("/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", image, "image/jpeg")})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture
def activity(client, make_key, jpeg_bytes: bytes, settings, worker) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Two clinics' cases, classified (so that the worker adds no event to the trail afterwards), one
    read by its clinic and probed by the other."""
    a, b = make_key(), make_key()
    case_a, case_b = submit(client, a, jpeg_bytes), submit(client, b, jpeg_bytes)
    for case_id in (case_a, case_b):
        wait_terminal(settings, uuid.UUID(case_id))
    client.get(f"/v1/cases/{case_a}", headers=a.headers)
    client.get(f"/v1/cases/{case_a}", headers=b.headers)  # denied: another clinic's case
    return {"a": a, "b": b, "case_a": case_a, "case_b": case_b}


def test_filters_and_pagination(client, make_key, activity) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    a: Tenant = activity["a"]  # type: ignore[assignment]
    case_a = activity["case_a"]
    body = client.get("/v1/audit-events", headers=auditor.headers, params={"case": case_a}).json()
    actions = [e["action"] for e in body["items"]]
    assert actions[-1] == "case.create" and "case.read" in actions  # newest first
    assert all(e["entity_id"] == case_a for e in body["items"])
    denied = client.get(
        "/v1/audit-events", headers=auditor.headers, params={"case": case_a, "outcome": "denied"}
    ).json()["items"]
    # b's probe of a's case: filed under b's clinic and under a's (the owner's auditors see it too)
    b: Tenant = activity["b"]  # type: ignore[assignment]
    assert [e["actor_key_id"] for e in denied] == [str(b.key_id)] * 2
    assert {e["clinic_id"] for e in denied} == {str(a.clinic_id), str(b.clinic_id)}
    by_actor = client.get("/v1/audit-events", headers=auditor.headers, params={"actor": str(a.key_id)}).json()
    assert by_actor["items"] and all(e["actor_key_id"] == str(a.key_id) for e in by_actor["items"])
    by_clinic = client.get(
        "/v1/audit-events", headers=auditor.headers, params={"clinic": str(a.clinic_id), "action": "case.create"}
    ).json()
    assert [e["entity_id"] for e in by_clinic["items"]] == [case_a]

    pages, cursor = [], None
    while True:
        params = {"clinic": str(a.clinic_id), "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/audit-events", headers=auditor.headers, params=params).json()
        pages += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == sorted(pages, reverse=True) and len(pages) == len(set(pages)) >= 3
    first = pages[-1]
    window = client.get(
        "/v1/audit-events",
        headers=auditor.headers,
        params={"clinic": str(a.clinic_id), "since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z"},
    ).json()
    assert window["items"] == [] and first


def test_auditors_see_records_never_images_or_results(client, make_key, activity) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    case_a = activity["case_a"]
    assert client.get(f"/v1/cases/{case_a}", headers=auditor.headers).status_code == 403
    assert client.get(f"/v1/cases/{case_a}/heatmap.png", headers=auditor.headers).status_code == 403
    export = client.get("/v1/audit-events/export", headers=auditor.headers, params={"case": case_a, **recent()}).text
    assert "probabilities" not in export and "image/jpeg" not in export


def test_clinic_scoped_auditor_and_other_roles(client, make_key, activity, settings, keyring) -> None:  # type: ignore[no-untyped-def]
    from core import keys
    from core.models import Role

    a: Tenant = activity["a"]  # type: ignore[assignment]
    b: Tenant = activity["b"]  # type: ignore[assignment]
    with session_scope(settings) as session:
        _, token = keys.create_key(session, keyring, role=Role.AUDITOR, clinic_id=a.clinic_id)
    scoped = {"Authorization": f"Bearer {token}"}
    rows = [
        json.loads(line)
        for line in client.get("/v1/audit-events/export", headers=scoped, params=recent()).text.splitlines()
    ]
    assert rows and all(r["clinic_id"] == str(a.clinic_id) for r in rows)
    assert str(b.clinic_id) not in json.dumps(rows) and activity["case_b"] not in json.dumps(rows)
    refused = client.get("/v1/audit-events", headers=scoped, params={"clinic": str(b.clinic_id)})
    assert refused.status_code == 403 and refused.json()["code"] == "clinic_scope"
    for role_key in (a, make_key("admin")):
        assert client.get("/v1/audit-events", headers=role_key.headers).status_code == 403


def test_exports_stream_whole_ranges(client, make_key, activity) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    a: Tenant = activity["a"]  # type: ignore[assignment]
    ndjson = client.get(
        "/v1/audit-events/export", headers=auditor.headers, params={"clinic": str(a.clinic_id), **recent()}
    )
    assert ndjson.headers["content-type"] == "application/x-ndjson" and ndjson.headers["cache-control"] == "no-store"
    records = [json.loads(line) for line in ndjson.text.splitlines()]
    assert {r["action"] for r in records} >= {"case.create", "case.read", "clinic.create"}
    as_csv = client.get(
        "/v1/audit-events/export",
        headers=auditor.headers,
        params={"clinic": str(a.clinic_id), "format": "csv", **recent()},
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in records]
    assert set(table[0]) >= {"occurred_at", "action", "outcome", "actor_key_id", "source_ip", "hash"}


def test_csv_export_defuses_formulas(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    tenant, auditor = make_key(), make_key("auditor")
    client.get("/v1/cases", headers={**tenant.headers, "User-Agent": '=HYPERLINK("http://evil")'})
    table = client.get(
        "/v1/audit-events/export",
        headers=auditor.headers,
        params={"clinic": str(tenant.clinic_id), "format": "csv", "action": "case.list", **recent()},
    ).text
    assert "'=HYPERLINK" in table and ",=HYPERLINK" not in table


def test_a_misspelt_filter_is_refused_not_ignored(client, make_key) -> None:  # type: ignore[no-untyped-def]
    """?actoin=case.read used to be ignored: the search or export came back unfiltered, which an
    auditor would take for the filtered answer."""
    auditor = make_key("auditor")
    for path, params in (
        ("/v1/audit-events", {"actoin": "case.read"}),
        ("/v1/audit-events/export", {"format": "csv", "acton": "case.read", **recent()}),
    ):
        refused = client.get(path, headers=auditor.headers, params=params)
        assert (refused.status_code, refused.json()["code"]) == (422, "unknown_parameter"), refused.text
        assert "act" in refused.json()["detail"]
    assert client.get("/v1/audit-events", headers=auditor.headers, params={"action": "case.read"}).status_code == 200


def test_auditor_queries_are_audited_and_chain_verifies(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    client.get("/v1/audit-events", headers=auditor.headers, params={"action": "case.read"})
    client.get("/v1/audit-events/export", headers=auditor.headers, params={"format": "csv", **recent()})
    seal_all(settings)
    report = check(settings)  # what the periodic dermq.audit_check does
    assert report.ok
    answer = client.get("/v1/audit-events/verify", headers=auditor.headers).json()
    assert answer["ok"] is True and answer["checked"] == report.size > 0 and answer["first_bad_id"] is None
    assert answer["tree_size"] == report.size and answer["checked_at"]
    with session_scope(settings) as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.actor_key_id == auditor.key_id)).all()
    assert {"audit.query", "audit.export", "audit.verify"} <= set(actions)


def test_no_audit_no_access(settings, make_key, jpeg_bytes: bytes, client) -> None:  # type: ignore[no-untyped-def]
    """If the read's audit record cannot be written, the data is not returned (503)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_key()
    case_id = submit(client, tenant, jpeg_bytes)
    impatient = create_app(settings.model_copy(update={"database_lock_timeout_ms": 300}))
    blocker = create_engine(settings.database_url)
    holding, release = threading.Event(), threading.Event()

    def hold_the_chain() -> None:
        # Appends take no global lock any more; a lock on the table itself blocks them (as a failed
        # or stalled database would), and the read must then fail rather than go unaudited.
        with blocker.connect() as connection, connection.begin():
            connection.execute(text("LOCK TABLE audit_events IN SHARE MODE"))
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold_the_chain)
    thread.start()
    try:
        assert holding.wait(10)
        with TestClient(impatient, raise_server_exceptions=False) as app_client:
            response = app_client.get(f"/v1/cases/{case_id}", headers=tenant.headers)
            listing = app_client.get("/v1/cases", headers=tenant.headers)
    finally:
        release.set()
        thread.join()
        blocker.dispose()
    for blocked in (response, listing):
        assert blocked.status_code == 503 and blocked.headers["retry-after"]
        assert blocked.json()["code"] == "storage_timeout"
        assert "created_at" not in blocked.text and "items" not in blocked.json()  # no case data at all
    with session_scope(settings) as session:  # and nothing claims the read happened
        reads = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.entity_id == case_id, AuditEvent.action == "case.read")
        )
    assert reads == 0
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).status_code == 200  # recovers


def test_bad_queries_are_4xx(client, make_key) -> None:  # type: ignore[no-untyped-def]
    """int() took the odd cursors: one of 0 or less answered an empty last page, as if the trail ended."""
    auditor = make_key("auditor")
    for params, code in (
        ({"cursor": "abc"}, "invalid_cursor"),
        *(({"cursor": c}, "invalid_cursor") for c in ("0", "-999", "1_0", "\u0661\u0662", " 12", "", "9" * 19)),
        ({"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, "invalid_time_range"),
        ({"outcome": "maybe"}, "invalid_input"),
        ({"case": "not-a-uuid"}, "invalid_input"),
        ({"action": "case.reed"}, "unknown_action"),
    ):
        response = client.get("/v1/audit-events", headers=auditor.headers, params=params)
        assert response.status_code in (400, 422) and response.json()["code"] == code, response.text


def test_auditor_pins_a_checkpoint_and_checks_proofs(client, make_key, settings, activity, keyring) -> None:  # type: ignore[no-untyped-def]
    import base64

    from core import checkpoint, merkle

    verifier = checkpoint.load_signing_keys(settings).signer.verifier  # handed to auditors out of band
    auditor = make_key("auditor")
    seal_all(settings)
    pinned = client.get("/v1/audit/checkpoints/latest", headers=auditor.headers)
    assert pinned.status_code == 200 and pinned.headers["cache-control"] == "no-store"
    note = pinned.json()["checkpoint"]
    old = checkpoint.parse(note, [verifier])
    assert old.size == pinned.json()["size"]

    with session_scope(settings) as session:
        case_event = session.scalar(
            select(AuditEvent.id).where(AuditEvent.entity_id == activity["case_a"], AuditEvent.action == "case.create")
        )
    client.get(f"/v1/cases/{activity['case_a']}", headers=activity["a"].headers)  # more events
    seal_all(settings)
    new = checkpoint.parse(
        client.get("/v1/audit/checkpoints/latest", headers=auditor.headers).json()["checkpoint"], [verifier]
    )
    assert new.size > old.size

    proof = client.get("/v1/audit/proofs/inclusion", headers=auditor.headers, params={"event": case_event}).json()
    leaf = merkle.leaf_hash(proof["leaf"].encode())
    assert base64.b64encode(leaf).decode() == proof["leaf_hash"] and f'"id":{case_event}' in proof["leaf"]
    path = [base64.b64decode(h) for h in proof["path"]]
    assert proof["tree_size"] == new.size
    assert merkle.verify_inclusion(leaf, proof["leaf_index"], new.size, path, new.root)

    consistency = client.get(
        "/v1/audit/proofs/consistency", headers=auditor.headers, params={"from": old.size, "to": new.size}
    ).json()
    hashes = [base64.b64decode(h) for h in consistency["path"]]
    assert merkle.verify_consistency(old.size, new.size, hashes, old.root, new.root)
    assert not merkle.verify_consistency(old.size, new.size, hashes, merkle.leaf_hash(b"rewritten"), new.root)

    # a clinic-scoped auditor proves its own clinic's events only; clinics get nothing
    from core import keys
    from core.models import Role

    with session_scope(settings) as session:
        _, token = keys.create_key(session, keyring, role=Role.AUDITOR, clinic_id=activity["b"].clinic_id)
    scoped = {"Authorization": f"Bearer {token}"}
    hidden = client.get("/v1/audit/proofs/inclusion", headers=scoped, params={"event": case_event})
    assert hidden.status_code == 404 and hidden.json()["code"] == "not_found"
    denied = client.get("/v1/audit/checkpoints/latest", headers=activity["a"].headers)
    assert denied.status_code == 403
    for params in ({"from": new.size + 5}, {"from": 2, "to": 1}, {"from": "x"}):
        bad = client.get("/v1/audit/proofs/consistency", headers=auditor.headers, params=params)
        assert bad.status_code in (400, 422), bad.text
    # a misspelt optional size would prove against another tree than the one asked
    for path, params in (("inclusion", {"event": case_event, "sise": 2}), ("consistency", {"from": 1, "too": 2})):
        misspelt = client.get(f"/v1/audit/proofs/{path}", headers=auditor.headers, params=params)
        assert (misspelt.status_code, misspelt.json()["code"]) == (422, "unknown_parameter"), misspelt.text
    with session_scope(settings) as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.actor_key_id == auditor.key_id)).all()
    assert {"audit.checkpoint", "audit.proof"} <= set(actions)


def test_exports_need_a_bounded_range_and_hold_no_transaction_between_pages(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    from contextlib import contextmanager

    auditor = make_key("auditor")
    now = datetime.now(UTC)
    for params in (
        {},
        {"since": now.isoformat()},
        {"since": (now - timedelta(days=40)).isoformat(), "until": now.isoformat()},
    ):
        refused = client.get("/v1/audit-events/export", headers=auditor.headers, params=params)
        assert refused.status_code == 400 and refused.json()["code"] == "invalid_time_range", refused.text

    open_now = []

    @contextmanager
    def counted():  # type: ignore[no-untyped-def]
        open_now.append(1)
        try:
            with session_scope(settings) as session:
                yield session
        finally:
            open_now.pop()

    filters = audit.AuditFilter(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    pages = 0
    seen: list[int] = []
    for page in audit.export_pages(counted, filters, batch=3):
        assert not open_now  # the page's transaction ended before the client gets it
        seen += [r["id"] for r in page]
        pages += 1
    assert pages > 1 and seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))


def test_every_recorded_action_is_a_documented_one(client, make_key, activity, settings) -> None:  # type: ignore[no-untyped-def]
    """An action the code records but ACTIONS (and so docs/API.md and the filter) does not know would
    be unsearchable: every action written by this test run must be listed."""
    from pathlib import Path

    with session_scope(settings) as session:
        # (tests of core.audit itself record made-up "test.*" actions in the same database)
        recorded = set(
            session.scalars(select(AuditEvent.action).where(~AuditEvent.action.startswith("test.")).distinct())
        )
    assert recorded and recorded <= set(audit.ACTIONS), recorded - set(audit.ACTIONS)
    documented = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    assert all(f"`{name}`" in documented for name in audit.ACTIONS)


def test_filters_take_a_clinic_name_and_a_key_prefix(client, worker, make_key, activity, settings, keyring) -> None:  # type: ignore[no-untyped-def]
    from core import keys
    from core.models import Role

    auditor = make_key("auditor")
    a: Tenant = activity["a"]  # type: ignore[assignment]

    # the worker may still be recording the activity's cases: compare once they have all ended
    def all_ended() -> bool:
        with session_scope(settings) as session:
            live = (
                select(func.count())
                .select_from(Case)
                .where(Case.clinic_id == a.clinic_id, Case.status.in_(["queued", "running"]))
            )
            return session.scalar(live) == 0

    support.wait_for(all_ended, timeout=60, what="the activity's cases to end")
    by_id = client.get("/v1/audit-events", headers=auditor.headers, params={"clinic": str(a.clinic_id)}).json()
    by_name = client.get("/v1/audit-events", headers=auditor.headers, params={"clinic": a.name}).json()
    assert by_name["items"] and by_name == by_id
    prefix = a.token.split("_")[1]
    for actor in (prefix, f"dq_{prefix}"):
        page = client.get("/v1/audit-events", headers=auditor.headers, params={"actor": actor}).json()
        assert page["items"] and {e["actor_key_id"] for e in page["items"]} == {str(a.key_id)}
    unknown = client.get("/v1/audit-events", headers=auditor.headers, params={"actor": "ffffffffffff"})
    assert unknown.status_code == 200 and unknown.json()["items"] == []
    missing = client.get("/v1/audit-events", headers=auditor.headers, params={"clinic": "no such clinic"})
    assert missing.status_code == 404 and missing.json()["code"] == "clinic_not_found"
    with session_scope(settings) as session:  # a scoped auditor: another clinic's name, or none, is out of scope
        _, token = keys.create_key(session, keyring, role=Role.AUDITOR, clinic_id=activity["b"].clinic_id)
    for name in (a.name, "no such clinic"):
        refused = client.get("/v1/audit-events", headers={"Authorization": f"Bearer {token}"}, params={"clinic": name})
        assert refused.status_code == 403 and refused.json()["code"] == "clinic_scope"


def test_a_filter_with_control_characters_is_a_422_not_a_500(client, make_key) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    for params in ({"clinic": "North\x00Clinic"}, {"actor": "dq_\x00abc"}):
        answer = client.get("/v1/audit-events", headers=auditor.headers, params=params)
        assert answer.status_code == 422 and answer.json()["code"] == "invalid_filter", answer.text
