"""Drift watch: the latest inputs and predictions against the active model's validation reference.

Run hourly by beat (``dermq.drift``), which publishes the latest report to Redis for the API's
``dermq_drift_psi`` and ``dermq_drift_alert`` gauges, and on demand by ``dermq drift report``. Reads
the results' input statistics (plain: image statistics, nothing about the patient) and labels, never
images. Labels are sealed with each result's findings (:mod:`core.results`), so the report opens
the window's results with the keyring, in one query, in memory only; what it publishes is the
aggregate (PSI, p-values, counts). Measured (docs/PERFORMANCE.md): reading and opening 10 000
results takes about 1.5 s on the 2-core development machine under load, of which the two AES-GCM
decryptions are 0.2 s; the beat runs it hourly. A case-free label tally kept at write time would
avoid it, but could not reproduce the "most recent ``MIN_CASES`` cases" window below. Only
diagnoses count: an image the model's gate found out of distribution got no label, and how often
that happens is counted apart (``dermq_results_total{outcome="out_of_distribution"}``).

The window rolls: the 24 hours up to now, not the UTC day so far (which just after midnight holds
almost nothing). When those hours hold fewer cases than the statistics need (``ml.drift.MIN_CASES``),
the window reaches back to the most recent ``MIN_CASES`` cases of the last seven days, so a quiet
site still gets a report. ``--day`` reports one UTC day: the 24 hours up to the next midnight.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.orm import Session

from core import audit, results
from core.config import Settings
from core.crypto import Keyring, load_keyring
from core.models import Case, CaseStatus, Outcome, Result
from ml import drift, registry

WINDOW = timedelta(hours=24)
#: how far a window with too few cases may reach back for the most recent ``MIN_CASES`` cases
LOOKBACK = timedelta(days=7)


def _reference(settings: Settings) -> tuple[str, dict[str, Any]]:
    manifest = registry.read_manifest(settings.model)
    reference = manifest.get("drift_reference")
    if reference is None:
        raise registry.RegistryError(
            f"model {manifest['model_id']} has no drift reference; run `python -m ml.drift --model ... --data ...`"
        )
    return manifest["model_id"], reference


def _cases(model_id: str, end: datetime) -> Select[uuid.UUID, dict[str, float], datetime]:
    return (
        select(Result.case_id, Result.input_stats, Result.created_at)
        .join(Case, Case.id == Result.case_id)
        .where(
            Case.status != CaseStatus.PURGED.value,  # erased: its label is gone, so it leaves the window whole
            Result.model_id == model_id,
            Result.outcome == Outcome.DIAGNOSIS.value,  # an out-of-distribution input has no label: no case of a class
            Result.created_at < end,
            Result.input_stats.has_all(
                array(drift.FEATURES)
            ),  # results stored before input statistics existed have none
        )
    )


def window_report(
    session: Session,
    settings: Settings,
    *,
    end: datetime | None = None,
    keyring: Keyring | None = None,
    actor: audit.Actor = audit.SYSTEM,
) -> dict[str, Any]:
    """PSI and p-value of each input statistic and of the label mix over the 24 hours before ``end``
    (default now), reaching back up to ``LOOKBACK`` for ``MIN_CASES`` cases when those hours hold fewer.
    ``keyring`` opens the labels (default: the key file of ``settings``)."""
    end = end or datetime.now(UTC)
    model_id, reference = _reference(settings)
    start = end - WINDOW
    rows = session.execute(_cases(model_id, end).where(Result.created_at >= start)).all()
    extended = len(rows) < drift.MIN_CASES
    if extended:
        recent = _cases(model_id, end).where(Result.created_at >= end - LOOKBACK)
        rows = session.execute(recent.order_by(Result.created_at.desc()).limit(drift.MIN_CASES)).all()
        start = min((row.created_at for row in rows), default=start)
    opened = results.read_results(  # without a case sealed under a destroyed period key (a restore)
        session, keyring or load_keyring(settings), [row.case_id for row in rows], skip_destroyed=True
    )
    audit.record(  # patient findings opened, if only to count them: recorded like any other reading
        session,
        action="drift.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="model",
        entity_id=model_id,
        detail={"cases": len(rows)},
    )
    # the query leaves erased cases out; a finding that does not open leaves with both its halves
    labelled = [(row, opened[row.case_id].label) for row in rows if row.case_id in opened]
    kept = [(row.input_stats, label) for row, label in labelled if label is not None]
    report = drift.compare(reference, [stats for stats, _ in kept], [label for _, label in kept])
    report.update(
        {
            "day": f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC",
            "window_start": start.isoformat(timespec="seconds"),
            "window_end": end.isoformat(timespec="seconds"),
            "window_extended": extended,
            "model_id": model_id,
            "threshold": drift.PSI_ALERT,
            "reference_n": reference["n"],
            "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return report


def day_report(
    session: Session,
    settings: Settings,
    day: date | None = None,
    *,
    keyring: Keyring | None = None,
    actor: audit.Actor = audit.SYSTEM,
) -> dict[str, Any]:
    """The rolling report up to now, or with ``day`` (UTC) the report for that day's 24 hours; reading
    the window's labels is audited as ``actor``'s."""
    if day is None:
        return window_report(session, settings, keyring=keyring, actor=actor)
    end = datetime(day.year, day.month, day.day, tzinfo=UTC) + WINDOW
    report = window_report(session, settings, end=end, keyring=keyring, actor=actor)
    if not report["window_extended"]:
        report["day"] = day.isoformat()
    return report


def publish(client: Any, report: dict[str, Any]) -> None:
    from core.queueing import DRIFT_KEY

    client.set(DRIFT_KEY, json.dumps(report), ex=3 * 24 * 3600)
