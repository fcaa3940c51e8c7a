"""Prometheus metrics, scraped over HTTP from a running API and a running worker: they appear and move
when a case is processed, and /metrics is not served on the public listener."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import support
from tests.conftest import live_api_process

pytestmark = pytest.mark.usefixtures("database")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_api_and_worker_metrics_move_with_a_case(live_api: str, worker, stack_env, tenant, fixture_images) -> None:  # type: ignore[no-untyped-def]
    api_metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    worker_metrics = f"http://127.0.0.1:{stack_env['DERMQ_WORKER_METRICS_PORT']}/metrics"
    support.wait_for(lambda: _up(api_metrics) and _up(worker_metrics), timeout=30, what="the metrics listeners")
    api_before, worker_before = scrape(api_metrics), scrape(worker_metrics)

    image = fixture_images["ISIC_0024370"].read_bytes()
    response = httpx.post(
        f"{live_api}/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", image, "image/jpeg")}
    )
    assert response.status_code == 202
    bad = httpx.post(f"{live_api}/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", b"", "image/jpeg")})
    assert bad.status_code == 422
    case_url = f"{live_api}{response.headers['location']}"
    support.wait_for(
        lambda: httpx.get(case_url, headers=tenant.headers).json()["status"] == "succeeded",
        timeout=120,
        interval=0.2,
        what="the case",
    )

    api_after = scrape(api_metrics)
    route = {"route": "/v1/cases", "method": "POST"}
    assert (
        total(api_after, "dermq_http_requests_total", status="202", **route)
        == total(api_before, "dermq_http_requests_total", status="202", **route) + 1
    )
    assert total(api_after, "dermq_http_request_duration_seconds_count", **route) >= 2
    assert total(api_after, "dermq_upload_bytes_count") == total(api_before, "dermq_upload_bytes_count") + 1
    assert total(api_after, "dermq_upload_bytes_sum") - total(api_before, "dermq_upload_bytes_sum") == len(image)
    assert (
        total(api_after, "dermq_upload_rejections_total", code="empty")
        == total(api_before, "dermq_upload_rejections_total", code="empty") + 1
    )
    assert {"urgent", "routine"} <= {dict(ls).get("priority") for (n, ls) in api_after if n == "dermq_queue_depth"}
    assert ("dermq_cases", (("status", "queued"),)) in api_after and ("dermq_stale_running_cases", ()) in api_after

    def worker_moved() -> bool:
        after = scrape(worker_metrics)
        return total(after, "dermq_jobs_total", outcome="succeeded") > total(
            worker_before, "dermq_jobs_total", outcome="succeeded"
        )

    try:
        support.wait_for(worker_moved, timeout=30, what="the worker's metrics to count the job")
    except TimeoutError:
        print(httpx.get(worker_metrics).text)
        raise
    after = scrape(worker_metrics)
    for name in (
        "dermq_inference_seconds_count",
        "dermq_gradcam_seconds_count",
        "dermq_queue_wait_seconds_count",
        "dermq_confidence_count",
        "dermq_predictions_total",
        "dermq_submit_to_finish_seconds_count",
    ):
        assert total(after, name) > total(worker_before, name), name
    assert any(n == "dermq_worker_info" and dict(ls).get("device") == "cpu" for (n, ls) in after)
    # no series per process: a worker replaces its children, and each would leave a new set behind
    assert not [n for (n, ls) in after if "pid" in dict(ls)]

    public = httpx.get(f"{live_api}/metrics")
    assert public.status_code == 404  # never on the public listener


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_latest_drift_report_is_published_as_gauges(live_api: str, redis_client) -> None:  # type: ignore[no-untyped-def]
    """dermq_drift_psi by feature and dermq_drift_alert (the report's verdict, which the DermqModelDrift
    alert fires on) follow the report the drift task left in Redis."""
    from core.queueing import DRIFT_KEY

    api_metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: _up(api_metrics), timeout=30, what="the API's metrics listener")
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat(timespec="seconds")
    report = {
        "status": "drift",
        "psi": {"megapixels": 3.2, "label": 0.01},
        "drifted": ["megapixels"],
        "computed_at": two_hours_ago,
    }
    try:
        redis_client.set(DRIFT_KEY, json.dumps(report))
        samples = scrape(api_metrics)
        assert samples[("dermq_drift_alert", ())] == 1.0
        assert samples[("dermq_drift_psi", (("feature", "megapixels"),))] == 3.2
        # how old the verdict is (DermqDriftReportStale): a stopped drift task left "stable" up for days
        assert samples[("dermq_drift_report_age_seconds", ())] == pytest.approx(7200, abs=120)
        redis_client.set(DRIFT_KEY, json.dumps({"status": "insufficient data", "psi": {"label": None}, "drifted": []}))
        samples = scrape(api_metrics)
        assert samples[("dermq_drift_alert", ())] == 0.0
        assert not [name for name, _ in samples if name == "dermq_drift_psi"]  # no figure below the minimum
    finally:
        redis_client.delete(DRIFT_KEY)


def test_an_audit_check_that_stopped_finishing_shows_in_its_age(live_api: str, redis_client, tenant) -> None:  # type: ignore[no-untyped-def]
    """dermq_audit_chain_ok keeps the last verdict; dermq_audit_check_age_seconds says how old it is (the
    DermqAuditCheckStale alert), and dermq_audit_unsealed_age_seconds how far sealing lags."""
    from core.queueing import AUDIT_CHECK_KEY

    api_metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: _up(api_metrics), timeout=30, what="the API's metrics listener")
    twenty_minutes_ago = (datetime.now(UTC) - timedelta(minutes=20)).isoformat(timespec="seconds")
    assert httpx.get(f"{live_api}/v1/cases", headers=tenant.headers).status_code == 200  # an audited read
    time.sleep(0.05)  # no sealer runs beside the tests: that event waits, and its age shows it
    try:
        redis_client.set(AUDIT_CHECK_KEY, json.dumps({"ok": True, "checked_at": twenty_minutes_ago}))
        samples = scrape(api_metrics)
        assert samples[("dermq_audit_chain_ok", ())] == 1.0
        assert 1200 <= samples[("dermq_audit_check_age_seconds", ())] < 1300
        assert samples[("dermq_audit_unsealed_age_seconds", ())] >= 0.05
    finally:
        redis_client.delete(AUDIT_CHECK_KEY)
    assert ("dermq_audit_check_age_seconds", ()) not in scrape(api_metrics)  # no check yet: no age


def test_a_case_queued_in_postgres_that_no_worker_takes_shows_how_long_it_has_waited(  # type: ignore[no-untyped-def]
    live_api: str, tenant, store_case, settings
) -> None:
    """A case that has no message (accepted while Redis refused writes, say) is counted by Postgres's
    view, which DermqQueuedCasesNotTaken reads: the age since it was queued (again)."""
    from sqlalchemy import delete, update

    from core.db import session_scope
    from core.models import Case

    api_metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: _up(api_metrics), timeout=30, what="the API's metrics listener")
    case_id = store_case(tenant, b"no message was ever sent for this case")
    try:
        with session_scope(settings) as session:  # queued again 30 days ago, after a first attempt (no
            session.execute(  # batch takes it in: only first attempts share one); no other case waits as long
                update(Case)
                .where(Case.id == case_id)
                .values(attempts=1, updated_at=datetime.now(UTC) - timedelta(days=30))
            )
        waited = scrape(api_metrics)[("dermq_oldest_queued_case_seconds", ())]
    finally:
        with session_scope(settings) as session:
            session.execute(delete(Case).where(Case.id == case_id))
    assert 30 * 86400 <= waited < 30 * 86400 + 120


def test_redis_s_memory_and_what_it_does_when_full_are_reported(live_api: str, redis_client) -> None:  # type: ignore[no-untyped-def]
    """DermqRedisMemoryNearFull and DermqRedisEvictsKeys read these: Redis's own figures."""
    api_metrics = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: _up(api_metrics), timeout=30, what="the API's metrics listener")
    samples = scrape(api_metrics)
    configured = redis_client.config_get("maxmemory*")
    assert samples[("dermq_redis_memory_used_bytes", ())] > 0
    assert samples[("dermq_redis_memory_limit_bytes", ())] == float(configured["maxmemory"])
    policies = [dict(labels)["policy"] for name, labels in samples if name == "dermq_redis_maxmemory_policy_info"]
    assert policies == [configured["maxmemory-policy"]]


def test_callbacks_no_callback_worker_takes_show_in_the_queue_depth(settings, private_broker) -> None:  # type: ignore[no-untyped-def]
    # What DermqCallbacksNotTaken reads: callbacks due that no callback worker takes (none runs here)
    import uuid
    from types import SimpleNamespace

    import redis

    from api.metrics import StateCollector
    from core.db import session_factory
    from core.publisher import callback_task, send
    from core.queueing import QUEUE_CALLBACKS
    from worker.celery_app import create_app

    app = create_app(settings.model_copy(update={"redis_url": private_broker.url}))
    client = redis.Redis.from_url(private_broker.url)
    state = SimpleNamespace(settings=settings, redis=client, sessions=session_factory(settings))

    def depth() -> float:
        families = {family.name: family for family in StateCollector(state).collect()}  # type: ignore[arg-type]
        return families["dermq_callback_queue_depth"].samples[0].value

    assert depth() == 0
    for _ in range(3):
        assert send(app, callback_task(uuid.uuid4()))
    assert depth() == 3
    with app.connection_for_read() as connection:  # a callback worker takes one
        assert connection.default_channel.basic_get(QUEUE_CALLBACKS, no_ack=True) is not None
    assert depth() == 2
    client.close()


def test_a_callback_pending_for_long_shows_in_its_age(settings, tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    # What DermqCallbacksStuck reads: attempts that fail before they are recorded leave the queue short
    from types import SimpleNamespace

    import redis

    from api.metrics import StateCollector
    from core.db import session_factory, session_scope
    from core.models import CallbackDelivery

    case_id = store_case(tenant, b"finished two hours ago")
    with session_scope(settings) as session:
        two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
        session.add(CallbackDelivery(case_id=case_id, clinic_id=tenant.clinic_id, created_at=two_hours_ago))
    client = redis.Redis.from_url(settings.redis_url)
    state = SimpleNamespace(settings=settings, redis=client, sessions=session_factory(settings))
    try:
        families = {family.name: family for family in StateCollector(state).collect()}  # type: ignore[arg-type]
        assert families["dermq_oldest_pending_callback_seconds"].samples[0].value >= 7200
    finally:
        client.close()
        with session_scope(settings) as session:
            session.delete(session.get(CallbackDelivery, case_id))
