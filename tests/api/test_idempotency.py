"""Idempotent submission: a portal that retries (a timeout, a dropped connection) with the same
Idempotency-Key gets the same case, never a second one, even when the retries race each other."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select, text

from core import idempotency
from core.crypto import load_keyring
from core.db import session_factory, session_scope
from core.models import AuditEvent, Case, CaseBlob
from tests import support
from tests.conftest import Tenant, create_case_for

pytestmark = pytest.mark.usefixtures("database")


def post(client, tenant: Tenant, image: bytes, key: str | None):  # type: ignore[no-untyped-def]
    headers = {**tenant.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/cases", headers=headers, files={"image": ("lesion.jpg", image, "image/jpeg")})


def stored(settings, clinic_id: uuid.UUID, key: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    digest = idempotency.digest(load_keyring(settings), clinic_id, key)
    with session_scope(settings) as session:
        ids = list(session.scalars(select(Case.id).where(Case.clinic_id == clinic_id, Case.idempotency_key == digest)))
        blobs = session.scalar(  # the images: a worker may already have added a heat map
            select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id.in_(ids), CaseBlob.kind == "image")
        )
        events = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "case.create", AuditEvent.entity_id.in_([str(i) for i in ids]))
        )
    return {"cases": len(ids), "blobs": blobs or 0, "create_events": events or 0}


def test_the_same_key_and_image_replay_the_case(client, tenant: Tenant, settings, fixture_images) -> None:  # type: ignore[no-untyped-def]
    image = fixture_images["ISIC_0024311"].read_bytes()
    first = post(client, tenant, image, "visit-2026-11-26-001")
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = post(client, tenant, image, "visit-2026-11-26-001")
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert stored(settings, tenant.clinic_id, "visit-2026-11-26-001") == {"cases": 1, "blobs": 1, "create_events": 1}


def digest_every_plain_key(settings) -> None:  # type: ignore[no-untyped-def]
    """Digest keys as the sweeper does until none is left in plain text: a case that its worker holds
    locked at that moment is passed over (``SKIP LOCKED``), and the next round takes it."""

    def all_digested() -> bool:
        with session_scope(settings) as session:
            idempotency.digest_plain_keys(session, load_keyring(settings), limit=50)
        with session_scope(settings) as session:
            return session.scalar(select(func.count()).select_from(Case).where(idempotency.PLAIN)) == 0

    support.wait_for(all_digested, timeout=30, what="every key stored in plain text to be digested")


def test_the_key_is_kept_only_as_a_keyed_digest_and_a_key_sent_before_that_still_finds_its_case(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, settings, fixture_images
) -> None:
    """A portal may build its key from the visit (a record number, a date), and the key outlives the
    case's erasure: the database holds an HMAC of it, never the key. A case stored before that
    (migration 0013) holds its key in plain text until the sweeper digests it; a retry finds it
    before and after."""
    image, other = (fixture_images[name].read_bytes() for name in ("ISIC_0024311", "ISIC_0024313"))
    first = post(client, tenant, image, "MRN-1234567-2026-12-05")
    assert first.status_code == 202, first.text
    with session_scope(settings) as session:
        kept = session.get(Case, uuid.UUID(first.json()["id"])).idempotency_key
        plain = session.scalar(select(func.count()).select_from(Case).where(Case.idempotency_key.contains("1234567")))
    assert kept is not None and kept.startswith("hmac-sha256:") and plain == 0
    assert len(kept) == len("hmac-sha256:") + 64

    legacy = post(client, tenant, other, "legacy-visit-7")
    assert legacy.status_code == 202
    with session_scope(settings) as session:  # as a case of the release before stored it
        session.get(Case, uuid.UUID(legacy.json()["id"])).idempotency_key = "legacy-visit-7"
    again = post(client, tenant, other, "legacy-visit-7")
    assert again.status_code == 200 and again.json()["id"] == legacy.json()["id"], again.text
    assert post(client, tenant, image, "legacy-visit-7").status_code == 409  # and compared like any other

    digest_every_plain_key(settings)
    now = stored(settings, tenant.clinic_id, "legacy-visit-7")
    assert (now["cases"], now["blobs"]) == (1, 1)  # its digest now; (a second case.create: the denied 409)
    after = post(client, tenant, other, "legacy-visit-7")
    assert after.status_code == 200 and after.json()["id"] == legacy.json()["id"], after.text


def test_a_plain_key_whose_digest_another_case_holds_loses_its_key_and_stops_no_sweep(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, settings, fixture_images
) -> None:
    """During a rolling upgrade a retry may be stored by each release: one case holds the key's
    digest, another the key as sent. Digesting the second would break the unique index, roll back the
    sweep's transaction and fail every sweep after; its key is dropped and the digest keeps its case.
    A key that only starts like a digest is a plain key like any other."""
    image, other, third = (
        fixture_images[name].read_bytes() for name in ("ISIC_0024311", "ISIC_0024313", "ISIC_0024315")
    )
    first = post(client, tenant, image, "visit-9")
    second, lookalike = post(client, tenant, other, "stored-by-an-old-pod"), post(client, tenant, third, "x")
    with session_scope(settings) as session:  # as the release before stored them
        session.get(Case, uuid.UUID(second.json()["id"])).idempotency_key = "visit-9"
        session.get(Case, uuid.UUID(lookalike.json()["id"])).idempotency_key = "hmac-sha256:mine"
    digest_every_plain_key(settings)
    with session_scope(settings) as session:
        assert session.get(Case, uuid.UUID(second.json()["id"])).idempotency_key is None
        kept = session.get(Case, uuid.UUID(lookalike.json()["id"])).idempotency_key
    assert kept == idempotency.digest(load_keyring(settings), tenant.clinic_id, "hmac-sha256:mine")
    again = post(client, tenant, image, "visit-9")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_the_same_key_with_another_image_is_a_conflict(client, tenant: Tenant, settings, fixture_images) -> None:  # type: ignore[no-untyped-def]
    one, other = (fixture_images[name].read_bytes() for name in ("ISIC_0024311", "ISIC_0024313"))
    assert post(client, tenant, one, "k-1").status_code == 202
    response = post(client, tenant, other, "k-1")
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_reused"
    assert response.headers["content-type"] == "application/problem+json"
    assert stored(settings, tenant.clinic_id, "k-1")["cases"] == 1


def test_the_key_of_an_erased_case_is_gone_not_reused(client, tenant: Tenant, settings, fixture_images) -> None:  # type: ignore[no-untyped-def]
    """Erasure takes the client reference the replay check compares: resending exactly what was sent
    used to be told it came with a different client_ref (409). It is told the case was erased."""
    image = fixture_images["ISIC_0024311"].read_bytes()
    headers = {**tenant.headers, "Idempotency-Key": "erased-1"}
    sent = {"headers": headers, "files": {"image": ("lesion.jpg", image, "image/jpeg")}, "data": {"client_ref": "p-1"}}
    first = client.post("/v1/cases", **sent)
    assert first.status_code == 202, first.text
    assert client.delete(f"/v1/cases/{first.json()['id']}", headers=tenant.headers).status_code == 200
    again = client.post("/v1/cases", **sent)
    assert again.status_code == 410 and again.json()["code"] == "case_purged", again.text
    assert stored(settings, tenant.clinic_id, "erased-1")["cases"] == 1  # nothing new stored


def test_keys_belong_to_one_clinic(client, make_key, fixture_images) -> None:  # type: ignore[no-untyped-def]
    image = fixture_images["ISIC_0024311"].read_bytes()
    mine, theirs = make_key(), make_key()
    a, b = post(client, mine, image, "shared-key"), post(client, theirs, image, "shared-key")
    assert (a.status_code, b.status_code) == (202, 202) and a.json()["id"] != b.json()["id"]


def test_two_idempotency_key_headers_are_refused(client, tenant: Tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    """Two header lines: all but the first were dropped unseen, and a retry sending them in the
    other order made a second case."""
    headers = [*tenant.headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    response = client.post("/v1/cases", headers=headers, files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")})
    assert response.status_code == 422 and response.json()["code"] == "invalid_idempotency_key"


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "new\x7fline"])
def test_malformed_keys_are_refused(client, tenant: Tenant, jpeg_bytes: bytes, key: str) -> None:  # type: ignore[no-untyped-def]
    headers = {**tenant.headers, "Idempotency-Key": key}
    files = {"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")}
    response = client.post("/v1/cases", headers=headers, files=files)
    assert response.status_code == 422 and response.json()["code"] == "invalid_idempotency_key"


def test_two_transactions_racing_with_one_key_make_one_case(
    settings, keyring, tenant: Tenant, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    """The loser of the race waits on the unique index for the winner's commit, then replays it."""
    key = f"race-{uuid.uuid4().hex}"

    def create(session):  # type: ignore[no-untyped-def]
        return create_case_for(session, keyring, tenant, jpeg_bytes, idempotency_key=key)

    winner = session_factory(settings)()
    try:
        winner_case, winner_created = create(winner)  # inserted, not yet committed
        loser: dict[str, object] = {}

        def race() -> None:
            with session_scope(settings) as session:
                case, created = create(session)
                loser.update(id=case.id, created=created)

        winner_pid = winner.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        thread = threading.Thread(target=race)
        thread.start()

        def blocked() -> bool:  # the loser's INSERT waits for the winner's transaction, on the unique index
            with session_scope(settings) as look:
                return bool(
                    look.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND :winner = ANY(pg_blocking_pids(pid))"
                        ),
                        {"winner": winner_pid},
                    )
                )

        support.wait_for(blocked, timeout=15, what="the second insert to wait for the first")
        winner.commit()
    finally:
        winner.close()
    thread.join(15)
    assert winner_created and loser["id"] == winner_case.id and loser["created"] is False
    assert stored(settings, tenant.clinic_id, key) == {"cases": 1, "blobs": 1, "create_events": 1}


def test_simultaneous_http_retries_with_one_key_make_one_case(
    live_api: str, tenant: Tenant, settings, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    key = f"burst-{uuid.uuid4().hex}"
    barrier = threading.Barrier(8)

    def send(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(
            f"{live_api}/v1/cases",
            headers={**tenant.headers, "Idempotency-Key": key},
            files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
            timeout=30,
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert all(r.headers.get("idempotent-replayed") == "true" for r in responses if r.status_code == 200)
    assert stored(settings, tenant.clinic_id, key) == {"cases": 1, "blobs": 1, "create_events": 1}
