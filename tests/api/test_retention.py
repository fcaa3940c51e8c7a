"""Retention and erasure: crypto-shredding removes images, heat maps and the result's findings; the
case, the operational part of its result and the audit trail remain.

A real purge acts on every case, period key and callback record of its database and period-key
folder: beat's purge here runs on a database, a broker and a period-key folder of this module's own
(``site``: an API and a worker on them), so the shared worker never takes it and no other module's
cases or keys meet it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.config import Settings
from core.crypto import load_keyring
from core.db import session_scope
from core.models import AuditEvent, CallbackDelivery, Case, CaseBlob, Result
from core.queueing import TASK_PURGE
from tests import processes, support
from tests.api.test_cases import submit, wait_done
from tests.conftest import new_tenant, own_period_keys_fixtures

pytestmark = pytest.mark.usefixtures("database")


@dataclass(frozen=True)
class Site:
    """This module's own stack for the purge: settings on its database, broker and period-key folder,
    and an API client on them (a worker on them runs meanwhile)."""

    settings: Settings
    client: Any  # fastapi.testclient.TestClient


own = own_period_keys_fixtures()[0]  # its keyring is not this module's: its other tests use the shared one


@pytest.fixture(scope="module")
def site(own: Settings, private_broker, stack_env, stack_dir: Path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    config = own.model_copy(update={"redis_url": private_broker.url})
    worker = processes.start_own_worker(config, stack_env, stack_dir / "retention-purge-worker.log")
    try:
        with TestClient(create_app(config), raise_server_exceptions=False) as client:
            yield Site(config, client)
    finally:
        worker.stop()


def folder_state(folder: Path) -> list[tuple[str, int, int]]:
    """Each file of a period-key folder: its name, size and last change."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def blobs(settings, case_id: str) -> int:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == uuid.UUID(case_id)))


def purge_events(settings, case_id: str, action: str = "case.purge") -> list[dict]:  # type: ignore[no-untyped-def]
    """The details of the case's successful shredding events (``case.delete``: a clinic's erasure)."""
    with session_scope(settings) as session:
        return [
            e.detail
            for e in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.entity_id == case_id, AuditEvent.action == action, AuditEvent.outcome == "success")
                .order_by(AuditEvent.id)
            )
        ]


def test_clinic_erasure(client, worker, tenant, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = submit(client, tenant, fixture_images["ISIC_0024403"].read_bytes()).json()["id"]
    done = wait_done(client, tenant, case_id)
    assert done["result"]["label"]
    assert blobs(settings, case_id) == 3  # image, heat map, the result's findings
    erased = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert erased.status_code == 200 and erased.json()["status"] == "purged"
    assert erased.json()["result"] is None
    assert blobs(settings, case_id) == 0
    with session_scope(settings) as session:  # nor a fingerprint that finds the case from a copy of the photo
        case = session.get(Case, uuid.UUID(case_id))
        assert case is not None and case.image_sha256 == "0" * 64
        assert (case.image_width, case.image_height, case.image_bytes) == (0, 0, 0)  # exact sizes find it too
        assert session.get(Result, uuid.UUID(case_id)).input_stats == {}  # and its brightness and contrast
        created = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == case_id, AuditEvent.action == "case.create")
        ).one()
        assert set(created.detail) == {"priority", "format", "megapixels", "megabytes"}  # sizes to one decimal
    again = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert again.status_code == 200 and again.json()["status"] == "purged"
    body = client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()
    assert body["status"] == "purged" and body["image"] is None
    assert body["result"] is None  # no diagnosis of an erased case is shown (nor kept: tests/core/test_phi.py)
    row = next(c for c in client.get("/v1/cases", headers=tenant.headers).json()["items"] if c["id"] == case_id)
    assert (row["status"], row["outcome"], row["label"], row["referral"]) == ("purged", None, None, None)
    heat = client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers)
    assert heat.status_code == 410 and heat.json()["code"] == "case_purged"
    report = client.get(f"/v1/cases/{case_id}/fhir", headers=tenant.headers)
    assert report.status_code == 410 and report.json()["code"] == "case_purged"
    # an auditor looking for erasures finds them under case.delete, by the clinic's key
    assert purge_events(settings, case_id, "case.delete") == [
        {"reason": "clinic_request", "blobs": 3},
        {"reason": "clinic_request", "already": True, "blobs": 0},  # the second request is on record too
    ]
    assert purge_events(settings, case_id) == []


def test_erasing_a_queued_case_stops_its_classification(
    client, tenant, store_case, jpeg_bytes: bytes, settings
) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_classification

    case_id = str(store_case(tenant, jpeg_bytes))
    assert client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).json()["status"] == "purged"
    assert run_classification(settings, uuid.UUID(case_id)) == "skipped"
    with session_scope(settings) as session:
        assert session.get(Result, uuid.UUID(case_id)) is None


def test_retention_purge_runs_as_a_beat_task(site: Site, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    from core.publisher import make_publisher

    config, client = site.settings, site.client
    keyring = load_keyring(config)  # the stack's keys with this module's period-key folder
    keys = keyring.periods
    assert keys is not None and settings.period_key_folder is not None
    shared = folder_state(settings.period_key_folder)
    tenant = new_tenant(config, keyring)
    old_id = submit(client, tenant, fixture_images["ISIC_0024412"].read_bytes()).json()["id"]
    new_id = submit(client, tenant, fixture_images["ISIC_0025903"].read_bytes()).json()["id"]
    wait_done(client, tenant, old_id)
    wait_done(client, tenant, new_id)
    keys.ensure("2019-01")  # a period long past retention, with no case: the purge destroys its key
    with session_scope(config) as session:
        session.execute(
            update(Case)
            .where(Case.id == uuid.UUID(old_id))
            .values(created_at=datetime.now(UTC) - timedelta(days=config.retention_days + 1))
        )
        # and a callback delivery settled long ago: its record goes too (the audit trail keeps the attempts)
        settled = datetime.now(UTC) - timedelta(days=config.callback_history_days + 1)
        session.add(
            CallbackDelivery(
                case_id=uuid.UUID(new_id), clinic_id=tenant.clinic_id, status="delivered", updated_at=settled
            )
        )
    make_publisher(config).send_task(TASK_PURGE, queue="maintenance")
    support.wait_for(lambda: blobs(config, old_id) == 0, timeout=60, what="the purge task")

    def delivery_left() -> bool:
        with session_scope(config) as session:
            return session.get(CallbackDelivery, uuid.UUID(new_id)) is not None

    support.wait_for(lambda: not delivery_left(), timeout=60, what="the purge task to delete the settled delivery")
    assert blobs(config, new_id) == 3
    assert client.get(f"/v1/cases/{new_id}", headers=tenant.headers).json()["result"]["label"]
    purged = client.get(f"/v1/cases/{old_id}", headers=tenant.headers).json()
    assert purged["status"] == "purged" and purged["result"] is None
    assert purge_events(config, old_id) == [{"reason": "retention", "blobs": 3}]
    # it ran on this module's folder and database; the shared ones are as they were
    assert keys.destroyed("2019-01")
    assert folder_state(settings.period_key_folder) == shared
    with session_scope(settings) as session:
        assert session.get(Case, uuid.UUID(old_id)) is None


def test_another_clinics_case_held_by_its_own_work_answers_404_at_once(  # type: ignore[no-untyped-def]
    client, make_key, store_case, settings
) -> None:
    # erase and outcome lock the case: another clinic's case was locked before its owner was checked,
    # so while its own worker held it the caller waited, then got a 503 where a missing case gets a 404
    from sqlalchemy import create_engine, text

    mine, theirs = make_key(), make_key()
    case_id = store_case(theirs, b"being classified")
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as holder, holder.begin():
            holder.execute(text("SELECT 1 FROM cases WHERE id = :id FOR UPDATE"), {"id": case_id})
            erase = client.delete(f"/v1/cases/{case_id}", headers=mine.headers)
            outcome = client.post(
                f"/v1/cases/{case_id}/outcome", headers=mine.headers, json={"diagnosis": "nv", "method": "histo"}
            )
    finally:
        engine.dispose()
    for answer in (erase, outcome):
        assert answer.status_code == 404 and answer.json()["code"] == "case_not_found", answer.text
