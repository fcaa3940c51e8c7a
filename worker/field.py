"""Field performance for Prometheus: each model's sensitivity, PPV and referral sensitivity on cases
with a confirmed outcome, and the melanoma floor of its model card; over all time, and over the cases
submitted in the last ``DERMQ_FIELD_WINDOW_MONTHS`` months (the ``recent`` window), each with its
melanoma alerts.

Run every 15 minutes by beat (``dermq.field_performance``), which publishes the report to Redis for
the API's ``dermq_field_*`` gauges: a query per window and run, one Redis read per scrape (the drift report's
path). ``dermq monitor report`` prints the same figures on demand. The report holds aggregates per
model and class only: no case, clinic or client reference.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from core import outcomes
from core.config import Settings
from core.queueing import FIELD_KEY
from ml import registry

#: the report outlives a few missed runs, not a stopped beat: the gauges then disappear
TTL_SECONDS = 3 * 24 * 3600


def field_report(session: Session, settings: Settings) -> dict[str, Any]:
    """Per model (``core.outcomes.field_performance``) with ``mel_sensitivity_floor`` (None where the
    model has no card), over all time (``models``) and over the recent window (``recent``: its first
    month and its models); the alerts of ``core.outcomes.melanoma_alerts`` in either, each naming its
    ``window``; and when it was computed."""
    since = outcomes.window_start(settings.field_window_months)
    windows = {
        "all": outcomes.field_performance(outcomes.confirmed_cases(session)),
        "recent": outcomes.field_performance(outcomes.confirmed_cases(session, since=since)),
    }
    served = {model_id for models in windows.values() for model_id in models}
    floors = {model_id: registry.mel_sensitivity_floor(model_id, configured=settings.model) for model_id in served}
    for models in windows.values():
        for model_id, figures in models.items():
            figures["mel_sensitivity_floor"] = floors[model_id]
    return {
        "models": windows["all"],
        "recent": {"since": since.isoformat(), "months": settings.field_window_months, "models": windows["recent"]},
        "alerts": [
            alert | {"window": window}
            for window, models in windows.items()
            for alert in outcomes.melanoma_alerts(models, floors)
        ],
        "min_confirmed_melanomas": outcomes.MIN_CONFIRMED_MELANOMAS,
        "computed_at": datetime.now(UTC).timestamp(),
    }


def publish(client: Any, report: dict[str, Any]) -> None:
    client.set(FIELD_KEY, json.dumps(report), ex=TTL_SECONDS)
