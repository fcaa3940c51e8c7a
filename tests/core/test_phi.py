"""Client references at rest: sealed like the images, never in a database dump, shredded with them."""

from __future__ import annotations

import subprocess
import uuid

from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from core import phi
from core.db import session_scope
from core.models import BlobKind, Case, CaseBlob
from tests.conftest import Tenant
from worker.tasks import sweep_once


def dump(settings) -> str:  # type: ignore[no-untyped-def]
    """What a backup holds: ``pg_dump --data-only`` of the whole database."""
    name = make_url(settings.database_url).database
    found = subprocess.run(
        ["pg_dump", "--data-only", "--no-owner", name], capture_output=True, text=True, check=True, timeout=120
    )
    return found.stdout


def test_a_client_reference_is_in_no_dump_and_reads_back(client, settings, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    marker = f"MRN-{uuid.uuid4().hex[:12]}"
    created = client.post(
        "/v1/cases",
        headers=tenant.headers,
        files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
        data={"client_ref": marker},
    )
    assert created.status_code == 202 and created.json()["client_ref"] == marker
    case_id = created.json()["id"]
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    listed = client.get("/v1/cases", headers=tenant.headers).json()["items"]
    assert next(c for c in listed if c["id"] == case_id)["client_ref"] == marker
    assert marker not in dump(settings)
    # erasure shreds it with the images
    erased = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert erased.status_code == 200 and erased.json()["client_ref"] is None
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] is None


def test_the_sweeper_seals_references_stored_before_they_were_sealed(  # type: ignore[no-untyped-def]
    client, settings, keyring, tenant: Tenant, store_case, publisher
) -> None:
    marker = f"LEGACY-{uuid.uuid4().hex[:12]}"
    case_id = store_case(tenant, b"an old case")
    with session_scope(settings) as session:  # as a release before migration 0007 stored it
        session.execute(update(Case).where(Case.id == case_id).values(plain_client_ref=marker))
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    report = sweep_once(settings, publisher, None)
    assert report["client_refs_sealed"] >= 1
    with session_scope(settings) as session:
        assert session.scalar(select(Case.plain_client_ref).where(Case.id == case_id)) is None
        kinds = set(session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all())
        assert kinds == {BlobKind.IMAGE.value, BlobKind.CLIENT_REF.value}
        assert phi.client_refs(session, keyring, [session.get(Case, case_id)]) == {case_id: marker}
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    assert marker not in dump(settings)
