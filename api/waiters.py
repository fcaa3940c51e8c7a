"""Long polls (``?wait=``): requests that wait for a case to end, woken when a worker commits it.

The API's :class:`~api.listener.Listener` hears each case's end (:mod:`core.announcements`) and
wakes the requests waiting for it: a waiting request holds an ``asyncio.Event``, not a thread, a
database connection or a transaction (its Session is closed and its thread given back before it
waits, and each look at the case takes a thread only for that look). At most ``limit`` requests wait
at once in one process, and at most a quarter of them for one clinic (one clinic's burst of long
polls could otherwise take every place for the rest); beyond that a request answers at once with the
case as it is (plain polling still works).

Nothing is lost to a missed notification: a request looks at its case before it waits (unless it
has just created the case and took its ticket before the case's task was sent) and after each
wake that was not its case's announcement, and wakes on its own every ``RECHECK_SECONDS`` (every
second while the listener is not connected: a request already waiting when the listener loses its
connection looks a second after the loss, not when its ten seconds are up, and every second after
that until the listener is back). An announcement is trusted without a look: Postgres
delivers it only once the transaction that ended the case has committed (:mod:`core.announcements`),
and the audited read that follows reads the case anyway.

A request whose client closes its connection while it waits stops waiting (:class:`ClientLeft`): it
gives its place back at once, and no audited read is written for an answer nobody would receive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar

from starlette.types import Receive

from api.db import RequestDb
from api.listener import Listener
from core import case_reads
from core.keys import Principal

#: The longest ``?wait=`` a request may ask for: well below the proxies' 90 s read timeout.
MAX_WAIT_SECONDS = 30.0
#: How long a request waits between looks while the listener is connected / is not.
RECHECK_SECONDS = 10.0
RECHECK_SECONDS_UNLISTENED = 1.0


class ClientLeft(Exception):
    """The client closed its connection while its request waited: there is nobody left to answer. The
    API answers it 499 (nginx's "client closed request"), which reaches its metrics and access log."""


class Ticket:
    """One waiting request's wake-up call."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._event = asyncio.Event()
        #: the case's end was announced (not just a wake-up of every ticket after a reconnection)
        self.announced = False
        #: the request's client has closed its connection
        self.left = False
        #: the listener lost its connection while this ticket waited (:meth:`hurry`)
        self._hurried = False

    def wake(self, announced: bool = False) -> None:
        self.announced = self.announced or announced
        self._event.set()

    def leave(self) -> None:
        self.left = True
        self._event.set()

    def hurry(self) -> None:
        """The listener has lost its connection: the case's end may now go unheard, so the wait under
        way ends within ``RECHECK_SECONDS_UNLISTENED`` (not at once: the database may be what went)."""
        self._hurried = True
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Until the case is announced, ``seconds`` pass, or it is time for another look."""
        step = RECHECK_SECONDS if self._listener.listening else RECHECK_SECONDS_UNLISTENED
        until = time.monotonic() + max(0.0, min(seconds, step))
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=max(0.0, until - time.monotonic()))
            self._event.clear()
            if not self._hurried or self.announced or self.left:
                return
            self._hurried = False
            until = min(until, time.monotonic() + RECHECK_SECONDS_UNLISTENED)


class CaseWaiters:
    """The waiting requests of one API process."""

    def __init__(self, listener: Listener, limit: int) -> None:
        self.listener = listener
        self.limit = limit
        #: the places one clinic's requests may take
        self.per_clinic = max(1, limit // 4) if limit > 0 else 0
        self._tickets: dict[uuid.UUID, set[Ticket]] = {}
        self._count = 0
        self._clinics: Counter[uuid.UUID | None] = Counter()
        listener.on_cases.append(self._wake)
        listener.on_lost.append(self._hurry)

    @property
    def waiting(self) -> int:
        return self._count

    @contextmanager
    def ticket(self, case_id: uuid.UUID, clinic_id: uuid.UUID | None = None) -> Iterator[Ticket | None]:
        """A ticket for ``case_id`` (None when ``limit`` requests already wait, or ``per_clinic`` of
        ``clinic_id``'s). Take it before the first look at the case, so that an end committed in
        between still wakes it."""
        if self._count >= self.limit or self._clinics[clinic_id] >= self.per_clinic:
            yield None
            return
        self.listener.start()
        ticket = Ticket(self.listener)
        self._tickets.setdefault(case_id, set()).add(ticket)
        self._count += 1
        self._clinics[clinic_id] += 1
        try:
            yield ticket
        finally:
            self._count -= 1
            self._clinics[clinic_id] -= 1
            if not self._clinics[clinic_id]:
                del self._clinics[clinic_id]
            tickets = self._tickets.get(case_id)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self._tickets[case_id]

    def _wake(self, case_ids: list[uuid.UUID]) -> None:
        """On the event loop: wake the tickets of these cases (every ticket for ``[]``)."""
        chosen = self._tickets.values() if not case_ids else [self._tickets.get(i, set()) for i in case_ids]
        for tickets in list(chosen):
            for ticket in list(tickets):
                ticket.wake(announced=bool(case_ids))

    def _hurry(self) -> None:
        """On the event loop, when the listener has lost its connection: every ticket looks soon."""
        for tickets in list(self._tickets.values()):
            for ticket in list(tickets):
                ticket.hurry()


#: the seconds a request has spent in long polls waiting for its case to end, a list of one that the
#: request's middleware sets (api.middleware): queue and model time, which the API's latency leaves out
LONG_POLL_WAIT: ContextVar[list[float] | None] = ContextVar("dermq_long_poll_wait", default=None)


def note_long_poll(seconds: float) -> None:
    waited = LONG_POLL_WAIT.get()
    if waited is not None:
        waited[0] += seconds


async def wait_for_end(
    db: RequestDb,
    waiters: CaseWaiters,
    principal: Principal,
    case_id: uuid.UUID,
    seconds: float,
    *,
    commit: Callable[[], Awaitable[None]] | None = None,
    created: bool = False,
    receive: Receive | None = None,
) -> None:
    """Return once the case has ended or ``seconds`` have passed (at once if ``principal`` may not
    read it: the audited read that follows answers that). No transaction stays open while waiting.

    ``commit``, if given, commits the request's transaction once the ticket is taken: with
    ``created`` (this request made the case, and its task goes out with that commit) the case cannot
    end before the ticket exists, so the first look is skipped. Pass :meth:`RequestDb.release` to
    commit and give the request's thread back in the same hop.

    ``receive``, the request's ASGI channel once its body has been read, is watched while the request
    waits: if its client disconnects, the wait ends with :class:`ClientLeft`."""
    if seconds <= 0:
        if commit is not None:
            await commit()
        return
    deadline = time.monotonic() + seconds
    with waiters.ticket(case_id, principal.clinic_id) as ticket:
        if commit is not None:
            await commit()
        if ticket is None:
            return
        watch = asyncio.create_task(_watch(receive, ticket)) if receive is not None else None
        try:
            await _wait(db, ticket, principal, case_id, deadline, look=not (created and commit is not None))
        finally:
            if watch is not None:
                watch.cancel()


async def _wait(
    db: RequestDb, ticket: Ticket, principal: Principal, case_id: uuid.UUID, deadline: float, *, look: bool
) -> None:
    """:func:`wait_for_end`'s looks and waits, with its ticket taken."""
    while True:
        if look:
            # the look's transaction ends and its thread goes back before the wait
            status = await db.run(
                lambda session: case_reads.peek_status(session, principal=principal, case_id=case_id), last=True
            )
            if status is None or status.terminal:
                return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        waiting = time.monotonic()
        try:
            await ticket.wait(remaining)
        finally:
            note_long_poll(time.monotonic() - waiting)
        if ticket.left:
            raise ClientLeft
        if ticket.announced:
            return  # committed: the read that follows finds it ended
        look = True


async def _watch(receive: Receive, ticket: Ticket) -> None:
    """Until the client disconnects, then :meth:`Ticket.leave`. The request's body has been read: what
    the channel still holds (an empty body's one message) is dropped, and the next message is the
    disconnect (uvicorn, once the connection is lost). A channel that fails leaves the wait alone."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a body limit's own refusal, say: not a disconnect
        return
    ticket.leave()
