"""Drift watch: one day's inputs and predictions against the active model's validation reference.

Run hourly by beat (``dermq.drift``), which publishes the latest report to Redis for the API's
``dermq_drift_psi`` gauges, and on demand by ``dermq drift report``. Reads only the results table
(labels and input statistics), never images.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import Result
from ml import drift, registry


def day_report(session: Session, settings: Settings, day: date | None = None) -> dict[str, Any]:
    """PSI of each input statistic and of the label mix for ``day`` (UTC; default today)."""
    day = day or datetime.now(UTC).date()
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    manifest = registry.read_manifest(settings.model)
    reference = manifest.get("drift_reference")
    if reference is None:
        raise registry.RegistryError(
            f"model {manifest['model_id']} has no drift reference; run `python -m ml.drift --model ... --data ...`"
        )
    rows = session.execute(
        select(Result.input_stats, Result.label).where(
            Result.created_at >= start,
            Result.created_at < start + timedelta(days=1),
            Result.model_id == manifest["model_id"],
        )
    ).all()
    stats = [row.input_stats for row in rows if row.input_stats]
    labels = [row.label for row in rows if row.input_stats]
    report = drift.compare(reference, stats, labels)
    report.update(
        {
            "day": day.isoformat(),
            "model_id": manifest["model_id"],
            "threshold": drift.PSI_ALERT,
            "reference_n": reference["n"],
            "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return report


def publish(client: Any, report: dict[str, Any]) -> None:
    from core.queueing import DRIFT_KEY

    client.set(DRIFT_KEY, json.dumps(report), ex=3 * 24 * 3600)
