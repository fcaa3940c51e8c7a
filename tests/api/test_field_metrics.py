"""Field performance as Prometheus gauges: outcomes reported over the API on finished cases, the
periodic task's computation (in this process, then on a real worker as beat schedules it), and the
``dermq_field_*`` gauges scraped from a running API's metrics listener."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete

from core import outcomes
from core.config import Settings
from core.db import session_scope
from core.models import Case, CaseStatus
from core.queueing import FIELD_KEY, TASK_FIELD
from ml import registry
from tests import support
from tests.api.test_metrics import _up, scrape
from tests.api.test_outcomes import post, result_row
from tests.conftest import Tenant, live_api_process

pytestmark = pytest.mark.usefixtures("database")

#: (model's label or None for out of distribution, referral, confirmed truth, how many)
CASES = [
    ("mel", True, "mel", 4),  # melanomas found
    ("nv", True, "mel", 9),  # missed, but referred
    ("nv", False, "mel", 9),  # missed and not referred
    ("nv", False, "nv", 2),
    ("mel", True, "nv", 1),  # a false melanoma
    (None, None, "mel", 1),  # out of distribution: no answer, so a missed melanoma, not referred
]


def record(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings: Settings, model: str, cases, submitted: datetime | None = None
) -> list[str]:
    """Finished cases of ``model`` (submitted now, or at ``submitted``) whose clinic reports their
    confirmed diagnoses over the API."""
    case_ids = []
    for label, referral, truth, count in cases:
        for _ in range(count):
            case_id = store_case(tenant, uuid.uuid4().bytes)
            with session_scope(settings) as session:
                session.add(result_row(case_id, model, label, referral))
                case = session.get(Case, case_id)
                case.status = CaseStatus.SUCCEEDED.value
                case.created_at = submitted or case.created_at
            response = post(client, tenant, case_id, diagnosis=truth, method="histo")
            assert response.status_code == 201, response.text
            case_ids.append(str(case_id))
    return case_ids


@pytest.fixture
def carded_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Settings whose served model is an entry with a fresh id and a model card whose melanoma
    sensitivity has the 95% interval [0.6, 0.8] on the test split."""
    manifest = registry.read_manifest(settings.model)
    manifest["model_id"] = f"field-gauges-{uuid.uuid4().hex[:8]}"
    entry = tmp_path / "entry"
    entry.mkdir()
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    metrics = {"assessment": {"per_image": {"mel_sensitivity": {"value": 0.7, "ci95": [0.6, 0.8]}}}}
    registry.write_json_atomic(entry / registry.METRICS, metrics)
    return settings.model_copy(update={"model": str(entry)})


def api_samples() -> Callable[[], dict]:  # type: ignore[type-arg]
    url = live_api_process[-1].metrics_url  # type: ignore[attr-defined]
    support.wait_for(lambda: _up(url), timeout=30, what="the API's metrics listener")
    return lambda: scrape(url)


def report_and_gauges(settings: Settings, redis_client, read: Callable[[], dict]) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    """The periodic task's report, computed here and published, and the API's gauges scraped while it is
    in Redis (removed after)."""
    from worker import field

    try:
        with session_scope(settings) as session:
            report = field.field_report(session, settings)
        field.publish(redis_client, report)
        return report, read()
    finally:
        redis_client.delete(FIELD_KEY)


def published(read: Callable[[], dict], key: tuple) -> dict | None:  # type: ignore[type-arg]
    samples = read()
    return samples if key in samples else None


def test_field_gauges_follow_the_computed_report(  # type: ignore[no-untyped-def]
    live_api, client, tenant: Tenant, store_case, carded_settings: Settings, redis_client
) -> None:
    model = registry.read_manifest(carded_settings.model)["model_id"]
    case_ids = record(client, tenant, store_case, carded_settings, model, CASES)
    read = api_samples()
    report, samples = report_and_gauges(carded_settings, redis_client, read)

    def gauge(name: str, window: str = "all", **labels: str) -> float | None:
        floor = name == "dermq_field_mel_sensitivity_floor"  # the card's: one per model, for both windows
        labelled = {"model_id": model, **labels} | ({} if floor else {"window": window})
        return samples.get((name, tuple(sorted(labelled.items()))))

    # by hand: 23 confirmed melanomas (one turned away by the gate), 4 labelled mel; 5 labels mel, 4 right;
    # 13 of the 23 referred
    assert gauge("dermq_field_sensitivity", **{"class": "mel"}) == pytest.approx(4 / 23)
    low, high = outcomes.wilson(4, 23)  # type: ignore[misc]
    assert gauge("dermq_field_sensitivity_lower", **{"class": "mel"}) == pytest.approx(low)
    assert gauge("dermq_field_sensitivity_upper", **{"class": "mel"}) == pytest.approx(high)
    assert gauge("dermq_field_ppv", **{"class": "mel"}) == pytest.approx(4 / 5)
    assert gauge("dermq_field_ppv_upper", **{"class": "mel"}) == pytest.approx(outcomes.wilson(4, 5)[1])  # type: ignore[index]
    assert gauge("dermq_field_sensitivity", **{"class": "nv"}) == pytest.approx(2 / 3)
    assert gauge("dermq_field_ppv", **{"class": "nv"}) == pytest.approx(2 / 20)
    assert gauge("dermq_field_referral_sensitivity") == pytest.approx(13 / 23)
    assert gauge("dermq_field_referral_sensitivity_lower") == pytest.approx(outcomes.wilson(13, 23)[0])  # type: ignore[index]
    assert gauge("dermq_field_confirmed_cases", **{"class": "mel"}) == 23
    assert gauge("dermq_field_confirmed_cases", **{"class": "df"}) == 0
    assert gauge("dermq_field_sensitivity", **{"class": "df"}) is None  # no confirmed df: no figure
    assert gauge("dermq_field_out_of_distribution_cases") == 1
    assert gauge("dermq_field_mel_sensitivity_floor") == 0.6
    assert samples[("dermq_field_report_timestamp_seconds", ())] == pytest.approx(time.time(), abs=120)
    # every case was submitted this month: the recent window holds them all
    assert gauge("dermq_field_sensitivity", "recent", **{"class": "mel"}) == pytest.approx(4 / 23)
    assert gauge("dermq_field_confirmed_cases", "recent", **{"class": "mel"}) == 23

    # what DermqFieldMelanomaSensitivityLow compares: the whole interval is below the card's floor,
    # on at least MIN_CONFIRMED_MELANOMAS confirmed melanomas; the report's own alert agrees
    upper, floor = (
        gauge("dermq_field_sensitivity_upper", **{"class": "mel"}),
        gauge("dermq_field_mel_sensitivity_floor"),
    )
    assert upper is not None and floor is not None and upper < floor
    assert gauge("dermq_field_confirmed_cases", **{"class": "mel"}) >= outcomes.MIN_CONFIRMED_MELANOMAS  # type: ignore[operator]
    assert [a["window"] for a in report["alerts"] if a["model_id"] == model] == ["all", "recent"]
    published = json.dumps(report)  # aggregates only: no case, clinic or key in Redis or in the labels
    assert not [c for c in case_ids if c in published] and str(tenant.clinic_id) not in published

    gone = read()  # the report expired or was removed: no figures, no stale alert
    assert not [name for name, labels in gone if name.startswith("dermq_field_") and ("model_id", model) in labels]


def test_a_recent_drop_in_melanoma_sensitivity_alerts_from_the_recent_window(  # type: ignore[no-untyped-def]
    live_api, client, tenant: Tenant, store_case, carded_settings: Settings, redis_client
) -> None:
    """A model that found melanomas for a year and now misses them: over all time its figure still
    looks healthy, so only the recent window (the last DERMQ_FIELD_WINDOW_MONTHS months of submissions)
    shows the drop and raises the alert; the year-old cases count in the lifetime figures only."""

    model = registry.read_manifest(carded_settings.model)["model_id"]
    year_ago = datetime.now(UTC) - timedelta(days=365)
    old = record(client, tenant, store_case, carded_settings, model, [("mel", True, "mel", 38)], submitted=year_ago)
    try:
        record(client, tenant, store_case, carded_settings, model, [("mel", True, "mel", 3), ("nv", False, "mel", 19)])
        report, samples = report_and_gauges(carded_settings, redis_client, api_samples())
    finally:  # the year-old cases are past retention: a purge elsewhere must not meet them
        with session_scope(carded_settings) as session:
            session.execute(delete(Case).where(Case.id.in_([uuid.UUID(c) for c in old])))

    def mel(name: str, window: str) -> float | None:
        return samples.get((name, (("class", "mel"), ("model_id", model), ("window", window))))

    assert mel("dermq_field_confirmed_cases", "all") == 60 and mel("dermq_field_confirmed_cases", "recent") == 22
    assert mel("dermq_field_sensitivity", "all") == pytest.approx(41 / 60)
    assert mel("dermq_field_sensitivity", "recent") == pytest.approx(3 / 22)
    # the card's floor is 0.6: over all time the interval reaches above it, over the recent cases it does not
    assert mel("dermq_field_sensitivity_upper", "all") > 0.6 > mel("dermq_field_sensitivity_upper", "recent")  # type: ignore[operator]
    assert [(a["window"], a["confirmed_melanomas"]) for a in report["alerts"] if a["model_id"] == model] == [
        ("recent", 22)
    ]
    assert report["recent"]["since"] == outcomes.window_start(carded_settings.field_window_months).isoformat()


def test_beat_schedules_the_task_and_a_worker_publishes_the_gauges(  # type: ignore[no-untyped-def]
    live_api, worker, client, tenant: Tenant, store_case, settings: Settings, redis_client
) -> None:
    from core.publisher import make_publisher
    from worker.celery_app import celery_config

    schedule = celery_config(settings)["beat_schedule"]["field-performance"]
    assert schedule["task"] == TASK_FIELD and schedule["schedule"] <= 3600

    model = f"field-worker-{uuid.uuid4().hex[:8]}"
    record(client, tenant, store_case, settings, model, [("mel", True, "mel", 2), ("nv", False, "mel", 1)])
    read = api_samples()
    key = ("dermq_field_sensitivity", (("class", "mel"), ("model_id", model), ("window", "all")))
    try:
        make_publisher(settings).send_task(TASK_FIELD)
        samples = support.wait_for(lambda: published(read, key), timeout=90, interval=1.0, what="the worker's report")
    finally:
        redis_client.delete(FIELD_KEY)
    assert samples[key] == pytest.approx(2 / 3)
    assert samples[("dermq_field_confirmed_cases", (("class", "mel"), ("model_id", model), ("window", "all")))] == 3
    # the worker's model card has no entry for this model id: no floor, so no alert can fire
    assert ("dermq_field_mel_sensitivity_floor", (("model_id", model),)) not in samples
