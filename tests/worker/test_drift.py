"""The drift report's window over the real results table: it rolls over midnight UTC instead of
starting afresh, and a quiet window reaches back for enough cases or says there are too few."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.config import Settings
from core.db import session_scope
from ml import drift, registry
from tests import support
from tests.ml.test_drift import population
from worker.drift import day_report, window_report

pytestmark = pytest.mark.usefixtures("database")

MIDNIGHT = datetime(2031, 1, 10, tzinfo=UTC)


@pytest.fixture
def drift_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Settings whose model is an entry (only its manifest) with a fresh id and a known reference."""
    manifest = registry.read_manifest(settings.model)
    manifest["model_id"] = f"drift-window-{uuid.uuid4().hex[:6]}"
    manifest["drift_reference"] = drift.build_reference(*population(np.random.default_rng(0), 1277))
    entry = tmp_path / "entry"
    entry.mkdir()
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    return settings.model_copy(update={"model": str(entry)})


@pytest.fixture
def add_results(
    drift_settings: Settings, keyring: Any, tenant: Any, store_case: Callable[..., uuid.UUID], jpeg_bytes: bytes
) -> Callable[..., None]:
    """Store ``len(times)`` results of the drift model, created at ``times``, with no-drift inputs
    (or ``megapixels`` overriding the size); their labels sealed, as the worker stores them."""
    model_id = registry.read_manifest(drift_settings.model)["model_id"]
    rng = np.random.default_rng(1)

    def add(times: list[datetime], megapixels: float | None = None) -> list[uuid.UUID]:
        stats, labels = population(rng, len(times))
        case_ids = [store_case(tenant, jpeg_bytes) for _ in times]
        with session_scope(drift_settings) as session:
            support.store_results(
                session,
                keyring,
                [
                    (
                        case_id,
                        support.diagnosis_values(
                            label=label,
                            model_id=model_id,
                            input_stats=s if megapixels is None else {**s, "megapixels": megapixels},
                            created_at=when,
                        ),
                    )
                    for case_id, when, s, label in zip(case_ids, times, stats, labels, strict=True)
                ],
            )
        return case_ids

    return add


def _report(settings: Settings, end: datetime) -> dict[str, Any]:
    with session_scope(settings) as session:
        return window_report(session, settings, end=end)


def test_window_just_after_midnight_holds_the_evening_before(
    drift_settings: Settings, add_results: Callable[..., None]
) -> None:
    add_results([MIDNIGHT - timedelta(minutes=60 - i // 2) for i in range(110)])  # 23:00-23:59 UTC
    add_results([MIDNIGHT + timedelta(minutes=i) for i in range(5)])  # 00:00-00:04 UTC
    add_results([MIDNIGHT - timedelta(days=2, hours=i) for i in range(30)])  # too old for the 24 hours

    report = _report(drift_settings, end=MIDNIGHT + timedelta(minutes=5))
    assert report["n"] == 115 and not report["window_extended"]
    assert report["window_start"] == (MIDNIGHT - timedelta(hours=23, minutes=55)).isoformat()
    assert report["status"] == "stable" and report["drifted"] == [] and None not in report["psi"].values()

    # a UTC day asked for by name is still that day's 24 hours
    with session_scope(drift_settings) as session:
        previous_day = day_report(session, drift_settings, (MIDNIGHT - timedelta(days=1)).date())
    assert previous_day["n"] == 110 and previous_day["day"] == "2031-01-09"


def test_quiet_window_reaches_back_for_enough_cases(drift_settings: Settings, add_results: Callable[..., None]) -> None:
    add_results([MIDNIGHT - timedelta(hours=30, minutes=i) for i in range(120)])
    report = _report(drift_settings, end=MIDNIGHT + timedelta(hours=1))  # the last 24 hours hold none
    assert report["window_extended"] and report["n"] == drift.MIN_CASES
    assert report["status"] == "stable" and report["drifted"] == []


def test_too_few_cases_in_a_week_report_insufficient_data(
    drift_settings: Settings, add_results: Callable[..., None]
) -> None:
    add_results([MIDNIGHT - timedelta(hours=i) for i in range(1, 41)], megapixels=12.0)
    add_results([MIDNIGHT - timedelta(days=8, minutes=i) for i in range(100)])  # beyond the lookback
    report = _report(drift_settings, end=MIDNIGHT)
    assert report["n"] == 40 and report["window_extended"]
    assert report["status"] == drift.INSUFFICIENT and report["drifted"] == [] and set(report["psi"].values()) == {None}


def test_camera_sized_uploads_in_the_window_alert(drift_settings: Settings, add_results: Callable[..., None]) -> None:
    add_results([MIDNIGHT - timedelta(minutes=i) for i in range(drift.MIN_CASES)], megapixels=12.0)
    report = _report(drift_settings, end=MIDNIGHT + timedelta(minutes=1))
    assert report["drifted"] == ["megapixels"] and report["status"] == "drift"


def test_opening_a_windows_labels_is_audited(drift_settings: Settings, add_results: Callable[..., None]) -> None:
    from sqlalchemy import select

    from core.models import AuditEvent

    add_results([MIDNIGHT - timedelta(minutes=i) for i in range(7)])
    model_id = registry.read_manifest(drift_settings.model)["model_id"]
    report = _report(drift_settings, end=MIDNIGHT)
    with session_scope(drift_settings) as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "drift.read", AuditEvent.entity_id == model_id)
        ).all()
    assert [(e.outcome, e.actor_type, e.detail) for e in events] == [("success", "system", {"cases": report["n"]})]


def test_erased_cases_leave_the_window(drift_settings: Settings, add_results: Callable[..., list[uuid.UUID]]) -> None:
    """An erased case keeps its input statistics (operational) but its label is shredded: the report
    leaves it out whole, where it used to fail ("N input statistics but N-1 labels"), stopping the
    hourly drift gauges and the drift alert after any erasure or retention purge."""
    from core import audit, retention
    from core.models import Case

    # a quiet day: the window reaches back for MIN_CASES cases, the newest three of them erased since
    case_ids = add_results([MIDNIGHT - timedelta(hours=30, minutes=i) for i in range(drift.MIN_CASES + 3)])
    with session_scope(drift_settings) as session:
        for case_id in case_ids[:3]:
            case = session.get(Case, case_id)
            assert case is not None
            retention.purge_case(session, case, actor=audit.SYSTEM, reason="erasure")
    report = _report(drift_settings, end=MIDNIGHT + timedelta(hours=1))
    # erased cases neither break the report nor take places in the cases it reaches back for
    assert report["window_extended"] and report["n"] == drift.MIN_CASES and report["status"] == "stable"
