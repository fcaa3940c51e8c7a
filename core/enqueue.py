"""Publishes collected on the Session and sent once its transaction has committed: the one way dermq
code publishes a task.

    enqueue(session, publisher, classify_task(case.id, priority))

keeps the task in ``session.info``; nothing leaves the process until the Session's outermost
transaction commits. Then, after the connection went back to the pool, the tasks are sent in the
order they were enqueued. A rollback (or a Session closed without committing) discards them, and so
does the rollback of a savepoint for the tasks enqueued inside it. A worker therefore never receives
an id whose row it cannot see yet, or one that never existed.

A send that fails (Redis down) is logged without PHI by :func:`core.publisher.send`; the other tasks
for that broker are then not tried (each would wait out the same failure) and stay for the sweeper,
which finds every queued case and pending callback without a message. ``on_sent`` learns of a
successful send where that matters (the sweeper's report): it runs with the ids sent, in a short
transaction of its own after the sends, never inside the transaction that enqueued them. It must not
write the rows of what it sent: a worker may be claiming them by then, and a claim skips locked rows
(the sweeper stamps its publishes in its own transaction, :mod:`core.recovery`).

The hooks are Session events registered on SQLAlchemy's :class:`~sqlalchemy.orm.Session` class when
this module is imported, so every Session that can enqueue also sends; a Session that enqueued
nothing pays one dictionary lookup per transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from core.publisher import Task, send

log = logging.getLogger("dermq.publisher")

#: Called with the ids of the tasks sent, in a transaction of its own after the sends.
OnSent = Callable[[Session, list[uuid.UUID]], None]

_PENDING = "dermq.enqueued"  # tasks of the transaction in progress
_READY = "dermq.committed"  # tasks whose transaction has committed, sent when it ends


@dataclass(frozen=True, slots=True)
class _Intent:
    publisher: Celery
    task: Task
    on_sent: OnSent | None
    savepoint: SessionTransaction | None  # the savepoint it was enqueued in; None: the outermost transaction


class SentPastTheLimit(SoftTimeLimitExceeded):
    """A worker task's soft time limit ran out while the tasks of a committed transaction were being
    sent: the commit stands, and the tasks not sent are the sweeper's to send. A caller that would
    treat a soft limit inside its transaction as "nothing stored" must not treat this one so."""


def enqueue(session: Session, publisher: Celery, task: Task, *, on_sent: OnSent | None = None) -> None:
    """Send ``task`` through ``publisher`` once ``session``'s transaction commits (never if it does not)."""
    intent = _Intent(publisher, task, on_sent, session.get_nested_transaction())
    session.info.setdefault(_PENDING, []).append(intent)


def enqueued(session: Session) -> list[Task]:
    """The tasks waiting for this Session's transaction to commit."""
    return [intent.task for intent in session.info.get(_PENDING, [])]


def _inside(transaction: SessionTransaction | None, savepoint: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is savepoint:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    # Also called when a savepoint is released: its tasks then belong to the enclosing transaction.
    if session.in_nested_transaction() or _PENDING not in session.info:
        return
    session.info.setdefault(_READY, []).extend(session.info.pop(_PENDING))


@event.listens_for(Session, "after_soft_rollback")
def _rolled_back(session: Session, previous: SessionTransaction) -> None:
    pending: list[_Intent] | None = session.info.get(_PENDING)
    if not pending:
        return
    if previous.nested:
        session.info[_PENDING] = [i for i in pending if i.savepoint is None or not _inside(i.savepoint, previous)]
    elif previous.parent is None:
        del session.info[_PENDING]


@event.listens_for(Session, "after_transaction_end")
def _ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return
    session.info.pop(_PENDING, None)  # closed without a commit: nothing happened, nothing to announce
    ready: list[_Intent] | None = session.info.pop(_READY, None)
    if ready:
        try:
            _send_all(session, ready)
        except SoftTimeLimitExceeded:  # a worker task's soft time limit: its handler must see it (the commit stands)
            raise SentPastTheLimit() from None
        except Exception as exc:  # the commit stands whatever happens here; the sweeper covers a loss
            log.warning(
                "sending committed tasks failed", extra={"event": "publish_failed", "error": type(exc).__name__}
            )


def _send_all(session: Session, intents: list[_Intent]) -> None:
    unreachable: set[int] = set()
    sent: dict[OnSent, list[uuid.UUID]] = {}
    skipped = 0
    for intent in intents:
        if id(intent.publisher) in unreachable:
            skipped += 1
            continue
        if not send(intent.publisher, intent.task):
            unreachable.add(id(intent.publisher))
            continue
        if intent.on_sent is not None:
            sent.setdefault(intent.on_sent, []).append(intent.task.case_id)
    if skipped:
        log.warning(
            "broker unreachable; the sweeper will publish the rest",
            extra={"event": "publish_skipped", "count": skipped},
        )
    for on_sent, ids in sent.items():
        try:
            with Session(bind=session.get_bind(), expire_on_commit=False) as follow_up, follow_up.begin():
                on_sent(follow_up, ids)
        except Exception as exc:
            log.warning(
                "could not record a publish; the sweeper may publish it once more",
                extra={"event": "publish_record_failed", "error": type(exc).__name__, "count": len(ids)},
            )
