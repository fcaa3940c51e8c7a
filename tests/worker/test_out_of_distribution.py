"""Images the model cannot judge. A worker serving a registry entry with an out-of-distribution gate
answers a blank image with the outcome ``out_of_distribution`` (its reasons, no label, probabilities,
referral or heat map) and a real lesion with a diagnosis: through the real API, Postgres, Redis and a
Celery worker process, and alike on the one-case and the batch path. Drift ignores such results."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core import audit, callback_attempts, results
from core.config import Settings
from core.db import session_scope
from core.models import AuditEvent, BlobKind, Case, CaseBlob, Result
from ml.labels import CLASSES, NUM_CLASSES
from tests import processes, support
from tests.api.test_metrics import scrape, total
from tests.conftest import Tenant, case_store, new_tenant

pytestmark = pytest.mark.usefixtures("database")

#: a threshold no score reaches: only the blank check (luminance contrast below 5) ever fires
NEVER = 1e12
DIAGNOSIS_FIELDS = ("label", "label_name", "probabilities", "confidence", "uncertainty", "referral", "referral_reasons")


def save_gated_entry(path: Path) -> Path:
    """A tiny registry entry (``tests/ml`` conftest's model) whose out-of-distribution gate flags blank
    images, and nothing a real lesion could trip: arrays of ``ml.ood.OODGate`` sized for its features."""
    from ml import ood
    from ml.entry import save_gate
    from tests.ml.conftest import save_tiny_entry, tiny_model

    entry = save_tiny_entry(path)
    width, components = int(tiny_model().num_features), 2
    gate = ood.OODGate(
        mean=np.zeros(width),
        whiten=np.eye(width, components),
        class_means=np.zeros((NUM_CLASSES, components)),
        colour_mean=np.zeros(9),
        colour_whiten=np.eye(9),
        thresholds={"contrast": 5.0, "noise": NEVER, "colour": NEVER, "energy": NEVER, "distance": NEVER},
    )
    return save_gate(entry, gate)


def blank_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 225), (255, 255, 255)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def gated_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = save_gated_entry(tmp_path_factory.mktemp("registry") / "gated-tiny-v1")
    from ml.predictor import Predictor

    assert Predictor.load(entry, device="cpu").gate is not None
    return entry


@dataclass
class GatedStack:
    settings: Settings
    worker: processes.Worker
    client: Any  # fastapi.testclient.TestClient
    metrics_url: str


@pytest.fixture(scope="module")
def gated(stack_env, stack_dir: Path, settings, database, gated_entry: Path, private_broker) -> Iterator[GatedStack]:  # type: ignore[no-untyped-def]
    """An API and a real worker process (one case per task) serving the gated entry, on a broker of
    their own (a private redis-server), so that the suite's main worker never takes their messages."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    broker = private_broker  # a redis-server of this module's own: no other worker takes these messages
    worker = None
    try:
        env = {
            **stack_env,
            "DERMQ_MODEL": str(gated_entry),
            "DERMQ_REDIS_URL": broker.url,
            "DERMQ_BATCHING": "off",
            "DERMQ_WORKER_METRICS_PORT": "0",  # a listener of its own
        }
        worker = processes.start_worker(env, stack_dir / "gated-worker.log", name="gated")
        config = settings.model_copy(update={"model": str(gated_entry), "redis_url": broker.url})
        with TestClient(create_app(config), raise_server_exceptions=False) as client:
            yield GatedStack(config, worker, client, worker.metrics_url)
    finally:
        if worker is not None:
            worker.stop()


def submit_and_wait(stack: GatedStack, tenant: Tenant, image: bytes) -> dict[str, Any]:
    response = stack.client.post(
        "/v1/cases", headers=tenant.headers, files={"image": ("lesion.jpg", image, "image/jpeg")}
    )
    assert response.status_code == 202, response.text
    url = f"/v1/cases/{response.json()['id']}"

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = stack.client.get(url, headers=tenant.headers).json()
        return body if body["status"] in ("succeeded", "failed") else None

    done: dict[str, Any] = support.wait_for(finished, timeout=120, interval=0.2, what="the case to finish")
    conforms_to_the_openapi_schema(stack, done)
    return done


def conforms_to_the_openapi_schema(stack: GatedStack, case: dict[str, Any]) -> None:
    """What the portal's generated client would check: the answer matches ``CaseOut`` in /openapi.json."""
    from jsonschema import Draft202012Validator

    components = stack.client.get("/openapi.json").json()["components"]
    Draft202012Validator({"$ref": "#/components/schemas/CaseOut", "components": components}).validate(case)


def test_a_blank_image_is_out_of_distribution_not_a_diagnosis(
    gated: GatedStack, tenant: Tenant, settings, keyring
) -> None:  # type: ignore[no-untyped-def]
    before = scrape(gated.metrics_url)
    done = submit_and_wait(gated, tenant, blank_jpeg())
    case_id = done["id"]

    # the case finished normally, once: not a failure, not retried
    assert done["status"] == "succeeded" and done["failure"] is None and done["attempts"] == 1, done
    result = done["result"]
    assert result["outcome"] == "out_of_distribution"
    assert "blank" in result["ood_reasons"]
    assert "dermoscopy" in result["message"] and "no diagnosis" in result["message"]
    assert not set(DIAGNOSIS_FIELDS) & set(result), result  # nothing of the model's raw answer
    assert result["gradcam_status"] == "not_applicable" and result["model"]["id"] == "gated-tiny-v1"
    assert done["links"]["heatmap"] is None
    listed = gated.client.get("/v1/cases", headers=tenant.headers).json()["items"]
    assert next(item for item in listed if item["id"] == case_id)["links"]["heatmap"] is None

    heat = gated.client.get(f"/v1/cases/{case_id}/heatmap.png", headers=tenant.headers)
    assert heat.status_code == 404 and heat.headers["content-type"] == "application/problem+json"
    problem = heat.json()
    assert problem["code"] == "heatmap_unavailable" and problem["status"] == 404
    assert "out of distribution" in problem["detail"] and problem["type"].endswith("/heatmap_unavailable")

    with session_scope(settings) as session:
        row = results.read_result(session, keyring, uuid.UUID(case_id))  # the findings opened
        assert row is not None and row.outcome == "out_of_distribution" and "blank" in row.ood_reasons
        assert (row.label, row.probabilities, row.confidence, row.uncertainty, row.referral) == (None,) * 5
        assert row.gradcam_class is None and row.referral_reasons == []
        assert (
            session.scalar(select(CaseBlob.id).where(CaseBlob.case_id == row.case_id, CaseBlob.kind == "heatmap"))
            is None
        )
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == case_id).order_by(AuditEvent.id)
        ).all()
        actions = [(e.action, e.outcome) for e in events]
        for expected in ("case.create", "case.start", "case.classify", "case.read"):
            assert (expected, "success") in actions, actions
        classify = next(e for e in events if e.action == "case.classify")
        assert classify.detail["outcome"] == "out_of_distribution" and classify.detail["gradcam"] == "not_applicable"
        assert audit.verify_chain(session).ok

    after = support.wait_for(
        lambda: (
            (s := scrape(gated.metrics_url))
            and total(s, "dermq_results_total", outcome="out_of_distribution")
            > total(before, "dermq_results_total", outcome="out_of_distribution")
            and s
        ),
        timeout=30,
        what="the worker to count the out-of-distribution result",
    )
    assert (
        total(after, "dermq_out_of_distribution_reasons_total", reason="blank")
        == total(before, "dermq_out_of_distribution_reasons_total", reason="blank") + 1
    )
    assert total(after, "dermq_predictions_total") == total(before, "dermq_predictions_total")  # no label counted
    assert (
        total(after, "dermq_jobs_total", outcome="succeeded")
        == total(before, "dermq_jobs_total", outcome="succeeded") + 1
    )


def test_a_real_lesion_with_the_same_gated_model_gets_a_diagnosis(
    gated: GatedStack, tenant: Tenant, fixture_images
) -> None:  # type: ignore[no-untyped-def]
    done = submit_and_wait(gated, tenant, fixture_images["ISIC_0024370"].read_bytes())
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["outcome"] == "diagnosis" and "ood_reasons" not in result and "message" not in result
    assert result["label"] in CLASSES and abs(sum(result["probabilities"].values()) - 1) < 1e-6
    assert result["gradcam_status"] == "ok"
    heat = gated.client.get(done["links"]["heatmap"], headers=tenant.headers)
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    listed = gated.client.get("/v1/cases", headers=tenant.headers).json()["items"]
    assert next(item for item in listed if item["id"] == done["id"])["links"]["heatmap"] == done["links"]["heatmap"]


def test_the_one_case_and_the_batch_path_store_the_same_outcomes(
    own_database, keyring, gated_entry: Path, fixture_images, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """On a database of its own: a batch claims the oldest queued cases of its whole database."""
    from worker import runtime
    from worker.batching import run_batch
    from worker.pipeline import run_classification

    settings, tenant, store_case = own_database, new_tenant(own_database, keyring), case_store(own_database, keyring)
    monkeypatch.setattr(runtime, "_predictor", None)  # this test's model; the cached one is back afterwards
    monkeypatch.setattr(runtime, "_cpu_predictor", None)
    one_by_one = settings.model_copy(update={"model": str(gated_entry), "batching": "off"})
    batched = one_by_one.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})
    lesion = fixture_images["ISIC_0024313"].read_bytes()

    alone = {"blank": store_case(tenant, blank_jpeg()), "lesion": store_case(tenant, lesion)}
    for case_id in alone.values():
        assert run_classification(one_by_one, case_id) == "succeeded"
    together = {"blank": store_case(tenant, blank_jpeg()), "lesion": store_case(tenant, lesion)}
    assert run_batch(batched, together["blank"]) == "succeeded"

    def stored(case_id: uuid.UUID) -> tuple[Any, ...]:
        with session_scope(settings) as session:
            case, row = session.get(Case, case_id), results.read_result(session, keyring, case_id)
            heatmap = session.scalar(
                select(CaseBlob.id).where(CaseBlob.case_id == case_id, CaseBlob.kind == BlobKind.HEATMAP.value)
            )
            assert case is not None and row is not None
            return (case.status, row.outcome, row.ood_reasons, row.label, row.gradcam_status, heatmap is not None)

    for kind in ("blank", "lesion"):
        assert stored(alone[kind]) == stored(together[kind]), kind
    assert stored(together["blank"]) == ("succeeded", "out_of_distribution", ["blank"], None, "not_applicable", False)
    assert stored(together["lesion"])[:2] == ("succeeded", "diagnosis") and stored(together["lesion"])[5]


def test_the_table_refuses_a_diagnosis_on_an_out_of_distribution_result(
    settings, tenant: Tenant, store_case, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    def insert(**fields: Any) -> None:
        common = {"gradcam_status": "not_applicable", "model_id": "m", "weights_sha256": "0" * 64, "device": "cpu"}
        case_id = store_case(tenant, jpeg_bytes)
        with session_scope(settings) as session:
            session.add(Result(case_id=case_id, timings={}, **(common | fields)))

    with pytest.raises(IntegrityError, match="ck_results_outcome_fields"):  # the raw label kept on it
        insert(outcome="out_of_distribution", ood_reasons=["blank"], label="nv")
    with pytest.raises(IntegrityError, match="ck_results_outcome_fields"):  # no reason given
        insert(outcome="out_of_distribution")
    with pytest.raises(IntegrityError, match="ck_results_outcome_fields"):  # a diagnosis without its fields
        insert(gradcam_status="ok")
    with pytest.raises(IntegrityError, match="ck_results_outcome"):
        insert(outcome="maybe", ood_reasons=["blank"])
    insert(outcome="out_of_distribution", ood_reasons=["blank", "colour"])


def test_the_callback_notice_carries_the_outcome_and_no_answer() -> None:
    case = Case(id=uuid.uuid4(), status="succeeded", finished_at=datetime(2031, 1, 1, tzinfo=UTC))
    notice = json.loads(callback_attempts.notice(case, "out_of_distribution"))
    assert notice["outcome"] == "out_of_distribution" and notice["status"] == "succeeded"
    assert set(notice) == {"type", "case_id", "status", "outcome", "timestamp"}


def test_drift_counts_diagnoses_only(settings, tmp_path: Path, tenant: Tenant, store_case, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    from ml import drift, registry
    from tests.ml.test_drift import population
    from worker.drift import window_report

    manifest = registry.read_manifest(settings.model)
    manifest["model_id"] = model_id = f"drift-ood-{uuid.uuid4().hex[:6]}"
    manifest["drift_reference"] = drift.build_reference(*population(np.random.default_rng(0), 1277))
    entry = tmp_path / "entry"
    entry.mkdir()
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    config = settings.model_copy(update={"model": str(entry)})
    end = datetime(2032, 3, 1, tzinfo=UTC)
    stats, labels = population(np.random.default_rng(1), drift.MIN_CASES)
    common = {"gradcam_status": "ok", "model_id": model_id, "weights_sha256": "0" * 64, "device": "cpu", "timings": {}}
    case_ids = [store_case(tenant, jpeg_bytes) for _ in range(drift.MIN_CASES + 40)]
    with session_scope(config) as session:
        for i, (s, label) in enumerate(zip(stats, labels, strict=True)):
            session.add(
                support.diagnosis_row(
                    case_ids[i], label=label, model_id=model_id, input_stats=s, created_at=end - timedelta(hours=1)
                )
            )
        for case_id in case_ids[drift.MIN_CASES :]:  # blank uploads, far outside the reference's contrast
            session.add(
                Result(
                    case_id=case_id,
                    outcome="out_of_distribution",
                    ood_reasons=["blank"],
                    input_stats={"brightness": 255.0, "contrast": 0.0, "megapixels": 0.0675},
                    created_at=end - timedelta(hours=1),
                    **(common | {"gradcam_status": "not_applicable"}),
                )
            )
    with session_scope(config) as session:
        report = window_report(session, config, end=end)
    assert report["n"] == drift.MIN_CASES and report["status"] == "stable", report
