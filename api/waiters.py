"""Long polls (``?wait=``): requests that wait for a case to end, woken when a worker commits it.

One thread per API process listens on Postgres (``LISTEN``, :mod:`core.case_events`) and wakes the
waiting requests of the cases it hears about; a waiting request holds an ``asyncio.Event``, not a
thread, a database connection or a transaction. At most ``limit`` requests wait at once in one
process; beyond that a request answers at once with the case as it is (plain polling still works).

Nothing is lost to a missed notification: a request looks at its case before it waits and again
after each wake, and wakes on its own every ``recheck_seconds`` (every second while the listener
is not connected, after a database restart for instance).
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg2
import psycopg2.extensions
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from api.db import RequestDb
from core import case_events, cases
from core.keys import Principal
from core.models import CaseStatus

log = logging.getLogger("dermq.api.waiters")

#: The longest ``?wait=`` a request may ask for: well below the proxies' 90 s read timeout.
MAX_WAIT_SECONDS = 30.0
#: How long a request waits between looks at its case while the listener is connected / is not.
RECHECK_SECONDS = 10.0
RECHECK_SECONDS_UNLISTENED = 1.0


class Ticket:
    """One waiting request's wake-up call."""

    def __init__(self, waiters: CaseWaiters) -> None:
        self._waiters = waiters
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Until the case is announced, ``seconds`` pass, or it is time for another look."""
        step = RECHECK_SECONDS if self._waiters.listening else RECHECK_SECONDS_UNLISTENED
        with suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, min(seconds, step)))
        self._event.clear()


class CaseWaiters:
    """The waiting requests of one API process, and the listener thread that wakes them."""

    def __init__(self, database_url: str, limit: int) -> None:
        self._url = database_url
        self.limit = limit
        self._tickets: dict[uuid.UUID, set[Ticket]] = {}
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    @property
    def waiting(self) -> int:
        return self._count

    @contextmanager
    def ticket(self, case_id: uuid.UUID) -> Iterator[Ticket | None]:
        """A ticket for ``case_id`` (None when ``limit`` requests already wait). Take it before the
        first look at the case, so that an end committed in between still wakes it."""
        if self._count >= self.limit:
            yield None
            return
        self._start()
        ticket = Ticket(self)
        self._tickets.setdefault(case_id, set()).add(ticket)
        self._count += 1
        try:
            yield ticket
        finally:
            self._count -= 1
            tickets = self._tickets.get(case_id)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self._tickets[case_id]

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="dermq-case-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ---------------------------------------------------------------- the listener thread

    def _wake(self, case_ids: list[uuid.UUID]) -> None:
        """On the event loop: wake the tickets of these cases (all of them for ``[]``)."""
        if not case_ids:
            for tickets in self._tickets.values():
                for ticket in tickets:
                    ticket.wake()
            return
        for case_id in case_ids:
            for ticket in self._tickets.get(case_id, ()):
                ticket.wake()

    def _notify_loop(self, case_ids: list[uuid.UUID]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, case_ids)

    def _connect(self) -> psycopg2.extensions.connection:
        url = make_url(self._url)
        args = url.translate_connect_args(username="user", database="dbname")
        connection = psycopg2.connect(
            **args, **{k: v for k, v in url.query.items() if isinstance(v, str)}, application_name="dermq-listener"
        )
        connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {case_events.CHANNEL}")
        return connection

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            connection = None
            try:
                connection = self._connect()
                self._listening.set()
                backoff = 0.5
                self._notify_loop([])  # whatever ended while nobody listened: every waiter looks again
                while not self._stop.is_set():
                    if select.select([connection], [], [], 1.0) == ([], [], []):
                        continue
                    connection.poll()
                    ended: list[uuid.UUID] = []
                    while connection.notifies:
                        ended += case_events.parse(connection.notifies.pop(0).payload)
                    if ended:
                        self._notify_loop(ended)
            except Exception as exc:
                if self._listening.is_set():
                    log.warning(
                        "lost the case listener; waiting requests look every second until it is back",
                        extra={"event": "case_listener_lost", "error": type(exc).__name__},
                    )
                self._listening.clear()
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self._listening.clear()
                if connection is not None:
                    with suppress(Exception):
                        connection.close()


async def wait_for_end(
    db: RequestDb, waiters: CaseWaiters, principal: Principal, case_id: uuid.UUID, seconds: float
) -> None:
    """Return once the case has ended or ``seconds`` have passed (at once if ``principal`` may not
    read it: the audited read that follows answers that). No transaction stays open while waiting."""
    if seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    with waiters.ticket(case_id) as ticket:
        if ticket is None:
            return
        while True:
            status = await db.run(lambda session: _look(session, principal, case_id))
            left = deadline - time.monotonic()
            if status is None or status.terminal or left <= 0:
                return
            await ticket.wait(left)


def _look(session: Session, principal: Principal, case_id: uuid.UUID) -> CaseStatus | None:
    try:
        return cases.peek_status(session, principal=principal, case_id=case_id)
    finally:
        session.rollback()  # nothing written: end the transaction, give the connection back
