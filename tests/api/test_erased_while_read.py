"""A case erased while a read of it is under way: the read answers as for an erased case (410
``case_purged``; in the list, ``purged`` without a result), never as a case that succeeded without
a heat map or a result. Each read takes the case in one statement and its sealed data in the next;
here the erasure (an operator's, in a transaction of its own) commits between the two. So does an
idempotent resubmission: its key finds the case, which is then erased before the answer is made.
Real API, Postgres and a real Celery worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from core import audit, retention
from core.db import session_scope
from core.models import AuditEvent
from tests.api.test_cases import submit, wait_done
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


@contextmanager
def erased_at(settings, case_id: str, table: str, *, after: str | None = None) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """While the block runs, the case is erased (committed) just before the API's first statement that
    reads ``table`` for it; or, with ``after``, just after its first statement on ``table`` that holds
    ``after``. The list says whether it happened."""
    done: list[str] = []

    def erase(statement: str, parameters: Any, wanted: str) -> None:
        if done or f"FROM {table}" not in statement or wanted not in f"{statement} {parameters}":
            return
        if after is not None and "INSERT" in statement:  # the intake's own INSERT ... SELECT of the case
            return
        done.append(statement)
        with session_scope(settings) as session:
            retention.erase_by_operator(session, uuid.UUID(case_id), actor=audit.SYSTEM)

    name = "before_cursor_execute" if after is None else "after_cursor_execute"
    wanted = case_id if after is None else after

    def hook(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        erase(statement, parameters, wanted)

    event.listen(Engine, name, hook)
    try:
        yield done
    finally:
        event.remove(Engine, name, hook)


def succeeded_case(client, tenant: Tenant, fixture_images) -> str:  # type: ignore[no-untyped-def]
    case_id = submit(client, tenant, fixture_images["ISIC_0024403"].read_bytes()).json()["id"]
    assert wait_done(client, tenant, case_id)["result"]["gradcam_status"] == "ok"
    return str(case_id)


def test_a_heat_map_read_as_its_case_is_erased_answers_410(client, worker, tenant, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = succeeded_case(client, tenant, fixture_images)
    with erased_at(settings, case_id, "case_blobs") as done:
        heat = client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers)
    assert done
    assert heat.status_code == 410 and heat.json()["code"] == "case_purged", heat.text
    with session_scope(settings) as session:  # and the refusal is on record as the erasure's
        refusal = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == case_id, AuditEvent.action == "heatmap.read")
        ).one()
    assert (refusal.outcome, refusal.detail) == ("failure", {"reason": "purged"})


def test_a_list_read_as_a_case_is_erased_shows_it_purged(client, worker, tenant, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = succeeded_case(client, tenant, fixture_images)
    with erased_at(settings, case_id, "results") as done:
        page = client.get("/v1/cases", headers=tenant.headers)
    assert done and page.status_code == 200
    row = next(c for c in page.json()["items"] if c["id"] == case_id)
    assert (row["status"], row["outcome"], row["label"], row["referral"]) == ("purged", None, None, None)


def test_a_fhir_read_as_its_case_is_erased_answers_410(client, worker, tenant, fixture_images, settings) -> None:  # type: ignore[no-untyped-def]
    case_id = succeeded_case(client, tenant, fixture_images)
    with erased_at(settings, case_id, "results") as done:
        report = client.get(f"/v1/cases/{case_id}/fhir", headers=tenant.headers)
    assert done
    assert report.status_code == 410 and report.json()["code"] == "case_purged", report.text


@pytest.mark.parametrize("client_ref", [None, "MRN-0042"])
def test_a_resubmission_as_its_case_is_erased_answers_410(  # type: ignore[no-untyped-def]
    client, worker, tenant, fixture_images, settings, client_ref: str | None
) -> None:
    image = fixture_images["ISIC_0024403"].read_bytes()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    fields = {} if client_ref is None else {"client_ref": client_ref}

    def send():  # type: ignore[no-untyped-def]
        files = {"image": ("lesion.jpg", image, "image/jpeg")}
        return client.post("/v1/cases", headers=tenant.headers | key, files=files, data=fields)

    case_id = send().json()["id"]
    wait_done(client, tenant, case_id)
    # the case found by its key, then erased before the answer is made
    with erased_at(settings, case_id, "cases", after="cases.idempotency_key =") as done:
        again = send()
    assert done
    assert again.status_code == 410 and again.json()["code"] == "case_purged", again.text
