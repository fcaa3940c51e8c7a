"""The audit sealer and check as Celery tasks on a real worker (what beat schedules every second and
every minute): events get sealed and signed, and the check's result lands in Postgres, not Redis."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import text

from core import audit, checkpoint
from core.db import session_scope
from core.publisher import make_publisher
from core.queueing import AUDIT_CHECK_KEY, TASK_AUDIT_CHECK, TASK_AUDIT_SEAL
from tests import support
from worker.celery_app import celery_config


def test_beat_schedules_the_sealer_every_interval(settings) -> None:  # type: ignore[no-untyped-def]
    schedule = celery_config(settings)["beat_schedule"]
    assert schedule["audit-seal"]["task"] == TASK_AUDIT_SEAL
    assert schedule["audit-seal"]["schedule"] == settings.audit_seal_interval_seconds <= 2


def test_seal_and_check_tasks_on_a_real_worker(settings, worker, redis_client) -> None:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        event_id = audit.record(
            session, action="test.task", outcome=audit.SUCCESS, actor=audit.SYSTEM, entity_id=str(uuid.uuid4())
        )
    publisher = make_publisher(settings)

    def sealed() -> bool:
        publisher.send_task(TASK_AUDIT_SEAL)
        with session_scope(settings) as session:
            return bool(session.scalar(text("SELECT 1 FROM audit_leaves WHERE event_id = :e"), {"e": event_id}))

    support.wait_for(sealed, timeout=90, interval=1.0, what="the sealer task to seal the event")
    with session_scope(settings) as session:
        note = session.scalar(text("SELECT note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"))
        before = session.scalar(text("SELECT count(*) FROM audit_verifications"))
    checkpoint.parse(note, checkpoint.load_signing_keys(settings).verifiers)

    publisher.send_task(TASK_AUDIT_CHECK)

    def checked():  # type: ignore[no-untyped-def]
        with session_scope(settings) as session:
            return (
                session.execute(
                    text("SELECT ok, size FROM audit_verifications ORDER BY id DESC LIMIT 1 OFFSET 0")
                ).first()
                if session.scalar(text("SELECT count(*) FROM audit_verifications")) > before
                else None
            )

    row = support.wait_for(checked, timeout=90, what="the check task's result")
    assert row.ok and row.size > 0
    raw = support.wait_for(lambda: redis_client.get(AUDIT_CHECK_KEY), timeout=30, what="the metrics flag")
    state = json.loads(raw)
    assert state["ok"] is True and "last_id" not in state and "last_hash" not in state  # no position in Redis
