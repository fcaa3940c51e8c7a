"""A worker task's soft time limit that comes while a publish waits on a broker that does not answer
(a Redis host hung, or a network dropping its packets): the publisher caught every exception to
fall back on the sweeper, Celery's ``SoftTimeLimitExceeded`` with them, so the task ran on past its
soft limit, its clean-up never ran, and the hard limit killed the child. Against the real database
and a broker address that accepts connections and never answers; the soft limit is raised the way
Celery's prefork pool raises it, from a signal handler in the task's thread."""

from __future__ import annotations

import signal
import socket
import uuid
from collections.abc import Iterator
from types import FrameType

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from core.config import Settings
from core.db import session_scope
from core.enqueue import enqueue
from core.publisher import callback_task, make_publisher, send

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def silent_broker(settings: Settings) -> Iterator[Settings]:
    """Settings whose broker accepts connections and answers nothing (each publish waits on it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{server.getsockname()[1]}/0"})
    finally:
        server.close()


@pytest.fixture
def soft_limit_soon() -> Iterator[None]:
    """SoftTimeLimitExceeded raised in this thread 0.3 s from now, as the prefork pool raises it."""

    def fire(_signum: int, _frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("soft_limit_soon")
def test_a_soft_time_limit_during_a_publish_reaches_the_task(silent_broker: Settings) -> None:
    with pytest.raises(SoftTimeLimitExceeded):
        send(make_publisher(silent_broker), callback_task(uuid.uuid4()))


@pytest.mark.usefixtures("soft_limit_soon")
def test_a_soft_time_limit_during_the_publishes_after_a_commit_reaches_the_task(silent_broker: Settings) -> None:
    publisher = make_publisher(silent_broker)
    with pytest.raises(SoftTimeLimitExceeded), session_scope(silent_broker) as session:
        enqueue(session, publisher, callback_task(uuid.uuid4()))  # sent once the (empty) transaction commits
