"""Prometheus metrics of the API process, served on their own listener (never the public port).

Counters and histograms are updated as requests pass; the queue depth per priority, the number of
cases per live state, stale running cases, the latest drift and field-performance figures
(api/field_metrics.py) and the last audit-chain check are read when Prometheus scrapes (from Redis
and Postgres, with short timeouts), so every API replica reports the same values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.deps import AppState
from api.field_metrics import field_families
from api.loop_watchdog import LoopWatchdog
from core import audit_log
from core.models import CallbackDelivery, CallbackStatus, Case, CaseStatus, Priority
from core.queueing import (
    AUDIT_CHECK_KEY,
    DRIFT_KEY,
    FIELD_KEY,
    PRIORITY_STEPS,
    PRIORITY_VALUE,
    QUEUE_CALLBACKS,
    queue_lists,
)

log = logging.getLogger("dermq.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "dermq_http_requests_total",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "dermq_http_request_duration_seconds",
    "HTTP request latency, without the time long polls waited for their case to end",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
UPLOAD_BYTES = Histogram(
    "dermq_upload_bytes",
    "size of accepted image uploads",
    buckets=(2**14, 2**16, 2**18, 2**20, 2**21, 2**22, 2**23, 2**24, 2**25),
    registry=REGISTRY,
)
UPLOAD_REJECTIONS = Counter(
    "dermq_upload_rejections_total", "refused uploads by problem code", ["code"], registry=REGISTRY
)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """One request: its count, and its latency without the time it waited for its case to end (a
    ``?wait=`` of up to 30 s is the queue's and the model's time, not the API's: with it, a portal's long
    polls made the API's p95 read seconds, and DermqApiLatencyHigh fire on a queue's wait).
    ``seconds``: the request's time less :data:`api.waiters.LONG_POLL_WAIT`."""
    method = method if method in METHODS else "other"  # any token is a method: one series each, unbounded
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


#: the methods counted by name; any other (``PROPFIND``, a made-up token) counts as ``other``
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class StateCollector(Collector):
    """Gauges read at scrape time from Redis and Postgres."""

    def __init__(self, app: AppState) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "dermq_queue_depth", "classification messages waiting in Redis, by priority", labels=["priority"]
        )
        try:
            totals = {"urgent": 0, "routine": 0}
            for step, name in zip(PRIORITY_STEPS, queue_lists(), strict=True):
                # below routine: urgent (at 0, those an older release published)
                priority = "urgent" if step < PRIORITY_VALUE[Priority.ROUTINE] else "routine"
                totals[priority] += int(self.app.redis.llen(name))
            for priority, value in totals.items():
                depth.add_metric([priority], value)
        except Exception as exc:
            log.warning("queue depth unavailable", extra={"error": type(exc).__name__})
        yield depth
        callbacks = GaugeMetricFamily(
            "dermq_callback_queue_depth",
            "completion callbacks due and waiting in Redis for a callback worker (retries waiting out their "
            "backoff are held by a worker and not counted)",
        )
        try:
            callbacks.add_metric([], sum(int(self.app.redis.llen(name)) for name in queue_lists(QUEUE_CALLBACKS)))
        except Exception as exc:
            log.warning("callback queue depth unavailable", extra={"error": type(exc).__name__})
        yield callbacks
        yield from self._redis_memory()

        cases = GaugeMetricFamily("dermq_cases", "cases in a live state", labels=["status"])
        stale = GaugeMetricFamily(
            "dermq_stale_running_cases", "cases running longer than the hard time limit plus grace (lost workers)"
        )
        unsealed = GaugeMetricFamily(
            "dermq_audit_unsealed_age_seconds",
            "age of the oldest committed audit event the log has not sealed yet (0: every one is sealed)",
        )
        waiting = GaugeMetricFamily(
            "dermq_oldest_queued_case_seconds",
            "how long the case queued longest has waited since it was queued, in Postgres (0: none is queued); "
            "unlike the queue depth, which counts Redis's messages, it sees cases no message will bring",
        )
        pending = GaugeMetricFamily(
            "dermq_oldest_pending_callback_seconds",
            "how long the completion callback pending longest has waited since its case finished (0: none is "
            "pending); its attempts, backoff included, end within about 20 minutes by default, unless it waits "
            "its turn behind many of its clinic's callbacks at a slow receiver",
        )
        try:
            with self.app.sessions() as session:
                lag = audit_log.unsealed_age(session)
                counts = dict(
                    session.execute(
                        select(Case.status, func.count())
                        .where(Case.status.in_([CaseStatus.QUEUED.value, CaseStatus.RUNNING.value]))
                        .group_by(Case.status)
                    ).all()
                )
                # by the database's clock, as the claims' started_at (core.case_claims) and the sweeper
                cutoff = func.now() - timedelta(
                    seconds=self.app.settings.task_time_limit + self.app.settings.running_grace_seconds
                )
                stuck = session.scalar(
                    select(func.count())
                    .select_from(Case)
                    .where(Case.status == CaseStatus.RUNNING.value, Case.started_at < cutoff)
                )
                # updated_at: when it was queued, or queued again (ix_cases_status_updated: one index entry)
                oldest = session.scalar(
                    select(func.extract("epoch", func.now() - func.min(Case.updated_at))).where(
                        Case.status == CaseStatus.QUEUED.value
                    )
                )
                # the pending rows only (ix_callback_deliveries_pending): few, however long the history
                unsent = session.scalar(
                    select(func.extract("epoch", func.now() - func.min(CallbackDelivery.created_at))).where(
                        CallbackDelivery.status == CallbackStatus.PENDING.value
                    )
                )
            for status in (CaseStatus.QUEUED.value, CaseStatus.RUNNING.value):
                cases.add_metric([status], counts.get(status, 0))
            stale.add_metric([], stuck or 0)
            unsealed.add_metric([], max(lag, 0.0) if lag is not None else 0.0)
            waiting.add_metric([], max(float(oldest), 0.0) if oldest is not None else 0.0)
            pending.add_metric([], max(float(unsent), 0.0) if unsent is not None else 0.0)
        except Exception as exc:
            log.warning("case counts unavailable", extra={"error": type(exc).__name__})
        yield cases
        yield stale
        yield unsealed
        yield waiting
        yield pending

        drift = GaugeMetricFamily(
            "dermq_drift_psi",
            "population stability index of the last 24 hours' inputs and predictions against the model's "
            "validation reference (absent below the report's minimum number of cases)",
            labels=["feature"],
        )
        drift_alert = GaugeMetricFamily(
            "dermq_drift_alert",
            "1 if the latest drift report says drifted (a PSI above 0.25 that is improbable as sampling noise), else 0",
        )
        drift_age = GaugeMetricFamily(
            "dermq_drift_report_age_seconds", "seconds since the latest drift report was computed (hourly)"
        )
        chain = GaugeMetricFamily("dermq_audit_chain_ok", "1 if the last audit-chain verification passed, else 0")
        check_age = GaugeMetricFamily(
            "dermq_audit_check_age_seconds", "seconds since the last audit-log verification finished"
        )
        try:
            raw = self.app.redis.get(DRIFT_KEY)
            if raw:
                report = json.loads(raw)
                for feature, value in report.get("psi", {}).items():
                    if value is not None:
                        drift.add_metric([feature], float(value))
                drift_alert.add_metric([], 1.0 if report.get("drifted") else 0.0)
                if report.get("computed_at"):  # a stale "stable" must not pass for today's (DermqDriftReportStale)
                    computed = datetime.fromisoformat(report["computed_at"])
                    drift_age.add_metric([], max(0.0, (datetime.now(UTC) - computed).total_seconds()))
            checked = self.app.redis.get(AUDIT_CHECK_KEY)
            if checked:
                state = json.loads(checked)
                chain.add_metric([], 1.0 if state.get("ok") else 0.0)
                finished = datetime.fromisoformat(state["checked_at"])
                check_age.add_metric([], max(0.0, (datetime.now(UTC) - finished).total_seconds()))
        except Exception as exc:
            log.warning("drift and audit figures unavailable", extra={"error": type(exc).__name__})
        yield drift
        yield drift_alert
        yield drift_age
        yield chain
        yield check_age

        try:
            raw = self.app.redis.get(FIELD_KEY)
            field = field_families(json.loads(raw) if raw else None)
        except Exception as exc:
            log.warning("field performance figures unavailable", extra={"error": type(exc).__name__})
            field = field_families(None)
        yield from field

    def _redis_memory(self) -> Iterator[GaugeMetricFamily]:
        """Redis's memory and what it does when full: the broker's messages, the rate limits and the
        published reports live there. At its ``maxmemory`` with ``noeviction`` it refuses writes (a
        case waits in Postgres for the sweeper); any other policy deletes keys (queued messages too)."""
        used = GaugeMetricFamily("dermq_redis_memory_used_bytes", "memory Redis uses (INFO memory used_memory)")
        limit = GaugeMetricFamily(
            "dermq_redis_memory_limit_bytes", "Redis's maxmemory (0: no limit of its own; the host's memory)"
        )
        policy = GaugeMetricFamily(
            "dermq_redis_maxmemory_policy_info",
            "1, labelled with what Redis does at its maxmemory: noeviction refuses writes, the others delete keys",
            labels=["policy"],
        )
        try:
            info = self.app.redis.info("memory")
            used.add_metric([], float(info["used_memory"]))
            limit.add_metric([], float(info["maxmemory"]))
            policy.add_metric([str(info["maxmemory_policy"])], 1.0)
        except Exception as exc:
            log.warning("Redis memory figures unavailable", extra={"error": type(exc).__name__})
        yield used
        yield limit
        yield policy


#: seconds between two heartbeats of a process's event loop
HEARTBEAT_SECONDS = 5.0
EVENT_LOOP_HEARTBEAT = Gauge(
    "dermq_api_event_loop_heartbeat_timestamp_seconds",
    "When the API process whose event loop ran its heartbeat longest ago last ran it (every 5 s; one that "
    "has not run it yet: when it started)",
    registry=REGISTRY,
    multiprocess_mode="livemin",  # the stalest live process's: one stuck process is enough to show
)
# A process counts from its start: its sample is there from now on (the file written on import), and
# at 0 until its loop's first beat the stalest heartbeat read 1970's, for as long as a process that
# replaced another took to load the app (DermqApiNotServing pending, a dashboard's staleness 56 years).
EVENT_LOOP_HEARTBEAT.set(time.time())


async def heartbeat(watchdog: LoopWatchdog | None = None, every: float = HEARTBEAT_SECONDS) -> None:
    """Mark the time on this process's event loop every ``every`` seconds, for as long as the loop
    runs tasks, for the metrics and for ``watchdog``. The metrics listener is a thread of its own (or
    the supervisor of several processes): it answers scrapes while a process's loop is stuck and serves
    no request, and nginx answers 502 that the API never counts; a heartbeat that stops says so
    (DermqApiNotServing), and the watchdog ends the process (:mod:`api.loop_watchdog`)."""
    while True:
        EVENT_LOOP_HEARTBEAT.set(time.time())
        if watchdog is not None:
            watchdog.beat()
        await asyncio.sleep(every)


def serve(app: AppState, *, processes: int = 1) -> None:
    """Start the metrics listener (``DERMQ_METRICS_HOST:DERMQ_METRICS_PORT``) in a daemon thread. With
    several API processes this runs in their supervisor, and serves what every process has counted
    (prometheus_client's multiprocess files, ``PROMETHEUS_MULTIPROC_DIR``) plus the shared gauges."""
    if not app.settings.metrics_port:
        return
    registry = REGISTRY
    if processes > 1:
        from core.metrics_files import MultiProcessFiles

        registry = CollectorRegistry(auto_describe=True)
        MultiProcessFiles(registry)
    registry.register(StateCollector(app))
    try:
        start_http_server(app.settings.metrics_port, addr=app.settings.metrics_host, registry=registry)
    except OSError as exc:  # the API itself still serves; the missing scrape target raises an alert
        log.error("metrics listener could not start", extra={"event": "metrics_failed", "error": type(exc).__name__})
        return
    log.info("metrics listening", extra={"event": "metrics_listening"})
