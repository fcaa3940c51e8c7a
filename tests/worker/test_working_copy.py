"""One decode of a camera image: the intake keeps a large upload's pixels at the size the worker
needs (its working copy, ``ml.working_copy``) beside the original, and the worker reads that copy
instead of decoding the upload again; the copy is deleted when the case ends, the original kept.

Through the real intake route, Postgres, a Redis broker of the module's own (no worker consumes it:
the tests run the worker's pipeline in process, on a database of their own) and the shipped model."""

from __future__ import annotations

import io
import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from bench.common import FIXTURE_IMAGES, camera_jpegs
from core import results
from core.config import Settings
from core.crypto import decrypt_blob
from core.db import session_scope
from core.models import AuditEvent, BlobKind, Case, CaseBlob
from ml import drift, working_copy
from ml.images import DEFAULT_LIMITS, decode
from tests.conftest import Tenant, case_store, new_tenant
from worker.batching import run_batch
from worker.pipeline import run_classification

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture(scope="module")
def config(own_database, private_broker) -> Settings:  # type: ignore[no-untyped-def]
    """This module's database, a broker no worker reads, batches of up to 4."""
    return own_database.model_copy(
        update={"redis_url": private_broker.url, "batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0}
    )


@pytest.fixture
def tenant(config, keyring) -> Tenant:  # type: ignore[no-untyped-def]
    return new_tenant(config, keyring)


def blobs(config: Settings, keyring, case_id: uuid.UUID) -> dict[str, tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    """kind -> (media type, decrypted bytes) of the case's blobs."""
    with session_scope(config) as session:
        rows = session.scalars(select(CaseBlob).where(CaseBlob.case_id == case_id)).all()
        return {
            row.kind: (row.media_type, decrypt_blob(keyring, row.sealed, case_id=case_id, kind=row.kind))
            for row in rows
        }


def input_stats(config: Settings, keyring, case_id: uuid.UUID) -> dict[str, float]:  # type: ignore[no-untyped-def]
    with session_scope(config) as session:
        assert session.get(Case, case_id).status == "succeeded"  # type: ignore[union-attr]
        view = results.read_result(session, keyring, case_id)
        assert view is not None
        return dict(view.input_stats)


def test_a_camera_upload_is_decoded_once_and_its_working_copy_dropped_when_the_case_ends(
    config: Settings, keyring, tenant: Tenant
) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    camera = camera_jpegs(1)[0]
    small = (FIXTURE_IMAGES / "ISIC_0024311.jpg").read_bytes()
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        ids = []
        for data in (camera, small):
            response = client.post("/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", data, "image/jpeg")})
            assert response.status_code == 202, response.text
            ids.append(uuid.UUID(response.json()["id"]))
    big_id, small_id = ids

    stored = blobs(config, keyring, big_id)
    assert set(stored) == {"image", "working"}
    assert stored["image"] == ("image/jpeg", camera)  # the original, as sent
    media_type, copy = stored["working"]
    assert media_type == working_copy.MEDIA_TYPE
    read = working_copy.read(copy)
    assert read.image.size == (500, 375) and (read.width, read.height) == (4000, 3000)
    assert set(blobs(config, keyring, small_id)) == {"image"}  # a HAM10000-sized upload needs none
    assert run_classification(config, small_id) == "succeeded"

    assert run_classification(config, big_id) == "succeeded"
    after = blobs(config, keyring, big_id)
    assert "working" not in after and after["image"] == ("image/jpeg", camera)
    assert Image.open(io.BytesIO(after["heatmap"][1])).size == (500, 375)  # drawn on the copy
    assert input_stats(config, keyring, big_id)["megapixels"] == 12.0  # the upload's own size is reported


@pytest.mark.parametrize("query", ["", "?wait=5"])
def test_a_camera_upload_cut_short_is_refused_and_leaves_nothing(config: Settings, tenant: Tenant, query: str) -> None:
    """The intake stores the case and its original from the header while the pixels decode
    (``api.intake_limits``): the decode's refusal must roll all of it back, audit event included."""
    from api.app import create_app

    camera = camera_jpegs(1)[0]
    cut = camera[: len(camera) * 9 // 10]
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        response = client.post(
            f"/v1/cases{query}",
            headers=tenant.headers,
            data={"client_ref": "MRN-0042"},
            files={"image": ("x.jpg", cut, "image/jpeg")},
        )
    assert response.status_code == 422 and response.json()["code"] == "truncated", response.text
    with session_scope(config) as session:
        mine = Case.clinic_id == tenant.clinic_id
        assert session.scalar(select(func.count()).select_from(Case).where(mine)) == 0
        assert session.scalar(select(func.count()).select_from(CaseBlob).join(Case).where(mine)) == 0
        events = select(func.count()).select_from(AuditEvent).where(AuditEvent.clinic_id == tenant.clinic_id)
        assert session.scalar(events.where(AuditEvent.action.like("case.%"))) == 0


@pytest.mark.parametrize("path", ["one case", "batch"])
def test_the_worker_classifies_the_working_copy_not_the_original(
    config: Settings, keyring, tenant: Tenant, path: str
) -> None:  # type: ignore[no-untyped-def]
    """Each case's working copy is made from *another* lesion than its original: what the worker
    reports about its input is that other lesion's, so it read the copy and left the original alone."""
    store = case_store(config, keyring)
    lesions = sorted(FIXTURE_IMAGES.glob("*.jpg"))
    cases = {}
    for original, other in ((lesions[0], lesions[1]), (lesions[2], lesions[3])):
        big = decode(other.read_bytes()).image.resize((2400, 1800))
        out = io.BytesIO()
        big.save(out, "JPEG", quality=95)
        copy = working_copy.decode_upload(out.getvalue(), DEFAULT_LIMITS, fit=config.overlay_max_side)[1]
        assert copy is not None
        case_id = store(tenant, original.read_bytes(), width=2400, height=1800, working_copy=copy)
        expected = drift.input_statistics(working_copy.read(copy).image, 2400, 1800)
        assert expected != drift.input_statistics(decode(original.read_bytes()).image, 2400, 1800)
        cases[case_id] = (original.read_bytes(), expected)

    if path == "batch":  # the first case's message: one batch takes both
        assert run_batch(config, next(iter(cases))) == "succeeded"
    else:
        assert [run_classification(config, case_id) for case_id in cases] == ["succeeded", "succeeded"]
    for case_id, (original, expected) in cases.items():
        assert input_stats(config, keyring, case_id) == expected
        after = blobs(config, keyring, case_id)
        assert "working" not in after and after["image"][1] == original


def test_a_case_that_fails_drops_its_working_copy_and_keeps_its_original(
    config: Settings, keyring, tenant: Tenant
) -> None:  # type: ignore[no-untyped-def]
    store = case_store(config, keyring)
    case_id = store(tenant, b"not an image", width=4000, height=3000, working_copy=b"P6\nnot a working copy")
    assert run_classification(config, case_id) == "failed"
    with session_scope(config) as session:
        case = session.get(Case, case_id)
        assert case is not None and case.failure_code == "invalid_image"
    assert set(blobs(config, keyring, case_id)) == {BlobKind.IMAGE.value}
