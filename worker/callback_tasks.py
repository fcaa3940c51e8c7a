"""The completion callback's Celery task: one attempt at a finished case's callback, its retries,
and the messages an earlier release sent to the maintenance queue, passed on to the callback workers
(:mod:`worker.callbacks_app`). The attempt itself is :mod:`worker.callbacks`; when a callback may be
attempted, :mod:`core.callback_pacing`. Registered with the other tasks by :mod:`worker.tasks`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy.orm import Session

from core import callback_pacing
from core.config import Settings
from core.db import session_scope
from core.enqueue import enqueue
from core.errors import KeyNotHeld
from core.models import CallbackDelivery, CallbackStatus
from core.publisher import callback_task
from core.queueing import QUEUE_MAINTENANCE, TASK_CALLBACK
from worker import callbacks as delivery
from worker import retries, runtime
from worker.celery_app import app
from worker.pipeline import keyring, settings
from worker.retries import MAX_RETRIES, retry_delay
from worker.retries import is_transient as _transient  # the name deliver_callback uses

log = logging.getLogger("dermq.worker")
_LOG_LEVELS = {
    "deferred": logging.DEBUG,
    "early": logging.DEBUG,
    "held": logging.DEBUG,
    "held_too_long": logging.WARNING,
}


@app.task(name=TASK_CALLBACK, bind=True, max_retries=None)
def deliver_callback(
    self: Any,
    case_id: str,
    after: int | None = None,
    waited: int = 0,
    transient: int = 0,
    turn: bool = False,
    held_looks: int = 0,
) -> str:
    """One attempt at a finished case's completion callback; retried with backoff until delivered or
    ``callback_max_attempts`` is reached (counted in the outbox row, not here). The attempt holds no
    transaction while the clinic's server answers (:mod:`worker.callbacks`). The message of a retry,
    or of a callback waiting its turn (:mod:`core.callback_pacing`), names the attempts it follows
    (``after``), how many turns it has waited (``waited``) and the transient failures (a database or
    key error before the attempt) in a row that brought it (``transient``), and the looks it has
    taken at its row while another transaction held it (``held_looks``: a bounded number, then the
    delivery is the sweeper's); a callback's first message names none. ``turn``: a turn at the
    clinic's receiver that an ended attempt handed it (a turn it cannot take is handed on, or dropped
    if the clinic is full again: the callback has a message of its own)."""
    config = settings()
    try:
        parsed = uuid.UUID(case_id)
    except (ValueError, TypeError, AttributeError):
        return "ignored"
    if (self.request.delivery_info or {}).get("routing_key") == QUEUE_MAINTENANCE:
        return _forward_callback(config, parsed)
    try:
        attempt = delivery.deliver(
            config, keyring(config), parsed, publisher=app, after=after, turn=turn, held_looks=held_looks
        )
    except Exception as exc:
        if isinstance(exc, KeyNotHeld):  # a key rotation still reaching this worker: retried, nothing spent
            log.warning(
                "a callback's secret is sealed under a key this worker does not hold yet",
                extra={"event": "key_not_held"},
            )
        if not _transient(exc) or transient >= MAX_RETRIES:
            # the row stays pending: the sweeper publishes it again later
            raise retries.withheld(exc) from None
        # returned, not thrown inside this handler: raised from None, it carries no trace of ``exc``
        again = {"after": after, "waited": waited, "transient": transient + 1, "held_looks": held_looks}
        retry = self.retry(exc=retries.withheld(exc), kwargs=again, countdown=retry_delay(transient), throw=False)
        raise retry from None
    log.log(
        # no attempt made (DEBUG); held at every look, its row by a transaction that is not dermq's
        # (WARNING: the runbook's DermqCallbacksStuck)
        _LOG_LEVELS.get(attempt.outcome, logging.INFO),
        "callback attempt",
        extra={
            "event": "callback",
            "case_id": case_id,
            "outcome": attempt.outcome,
            "attempt": attempt.attempt,
            "status_code": attempt.http_status,
        },
    )
    metrics = runtime.worker_metrics()
    if metrics is not None:
        metrics.record_callback(attempt.outcome)
    if attempt.outcome == "retry":  # the backoff the row was stamped with: no lease is taken before it
        raise self.retry(kwargs={"after": attempt.attempt}, countdown=attempt.retry_in)
    if attempt.outcome == "reregistered":  # nothing sent to the registration it leased: at once, afresh
        raise self.retry(kwargs={"after": after, "waited": waited, "held_looks": held_looks}, countdown=0)
    if attempt.outcome == "early":  # a host's clock sent it early: the rest of the backoff
        raise self.retry(kwargs={"after": after, "waited": waited}, countdown=attempt.retry_in)
    if attempt.outcome == "held":  # another transaction held its row (a turn handed to it, which may be
        # dropped): it looks again, later each time, a bounded number of times (then "held_too_long")
        again = {"after": after, "waited": waited, "held_looks": held_looks + 1}
        raise self.retry(kwargs=again, countdown=attempt.retry_in)
    if attempt.outcome == "deferred" and turn:  # the turn was taken meanwhile: its own message goes on
        return attempt.outcome
    if attempt.outcome == "deferred":  # an attempt at the same receiver that ends hands it its turn sooner
        countdown = callback_pacing.turn_seconds(config, waited)
        raise self.retry(kwargs={"after": attempt.attempt, "waited": waited + 1}, countdown=countdown)
    return attempt.outcome


def _forward_callback(config: Settings, case_id: uuid.UUID) -> str:
    """A callback's message on the maintenance queue: sent by a release before callbacks had a queue of
    their own, or its retry (Celery sends a retry back to the queue its message came from). A
    classification worker takes that queue, and has no route out: the delivery, if still pending, goes
    on to the callback workers (:mod:`worker.callbacks_app`), unattempted, and this message is done. A
    publish that fails (logged by core.publisher) or a database error leaves the delivery pending,
    and the sweeper sends it again to the callbacks queue."""

    def sent(_session: Session, _ids: list[uuid.UUID]) -> None:
        log.info(
            "callback passed on to the callback workers", extra={"event": "callback_forwarded", "case_id": str(case_id)}
        )

    with session_scope(config) as session:
        row = session.get(CallbackDelivery, case_id)
        if row is None or row.status != CallbackStatus.PENDING.value:
            return "ignored"
        from worker.tasks import _the_publisher  # this process's, shared with the periodic tasks

        enqueue(session, _the_publisher(config), callback_task(case_id), on_sent=sent)
    return "forwarded"
