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


def test_the_minutes_check_walks_for_half_the_soft_time_limit_at_most(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A check stopped by the soft time limit stores nothing and starts over the next minute: with
    # DERMQ_TASK_SOFT_TIME_LIMIT under about 35 s, a check catching up on a long log walked its 30 s,
    # was stopped each minute, and DermqAuditCheckStale stayed on. It takes half the limit at most, as
    # the sweep and the purge do.
    from types import SimpleNamespace

    from worker import sealing

    budgets: list[float] = []

    def check(config, keys, *, budget=sealing.CHECK_BUDGET_SECONDS, window=0):  # type: ignore[no-untyped-def]
        budgets.append(budget)
        return SimpleNamespace(complete=False, size=0, to_dict=dict)  # under way: nothing stored

    monkeypatch.setattr(sealing, "check", check)
    monkeypatch.setattr(sealing, "_signing_keys", lambda config: None)
    for soft, expected in ((20.0, 10.0), (60.0, sealing.CHECK_BUDGET_SECONDS)):
        monkeypatch.setattr(sealing.app, "dermq_settings", settings.model_copy(update={"task_soft_time_limit": soft}))
        sealing.audit_check.apply().get()
        assert budgets.pop() == expected
