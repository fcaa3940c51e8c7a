"""What the API hears from Postgres: one thread per API process ``LISTEN``s on the channels of
:mod:`core.announcements` and hands what it hears to the event loop.

- a case's end wakes the requests waiting for it (:mod:`api.waiters`);
- a change to which keys are valid empties the cache of verified keys (:mod:`api.key_cache`).

While the thread is not connected (at start, after a database restart), :attr:`Listener.listening`
is False: the key cache is not used and waiting requests look at their case every second, those that
were already waiting when the connection was lost too (they are told of the loss). On each
(re)connection every subscriber is told that it may have missed something.

A connection can die without a word: a database host that vanished, a NAT or firewall that dropped
an idle connection, a proxy that hangs. Nothing then arrives, which looks like nothing happening, and
a revoked key would stay trusted until the cache forgot it. So the connection is driven without
blocking, and after :data:`HEARTBEAT_SECONDS` without traffic the thread asks Postgres a ``SELECT 1``
that must come back within :data:`ANSWER_SECONDS`, as connecting must: otherwise the connection is
counted lost and opened again. The heartbeat also keeps an idle connection known to middleboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable

import psycopg2
import psycopg2.extensions
from sqlalchemy.engine import make_url

from core import announcements

log = logging.getLogger("dermq.api.listener")

#: seconds without a notification after which the connection is asked whether it is still there
HEARTBEAT_SECONDS = 10.0
#: seconds a connection attempt or a heartbeat may take before the connection is counted lost
ANSWER_SECONDS = 5.0


class Listener:
    """The listening thread of one API process (started on first use, on the running event loop)."""

    def __init__(
        self, database_url: str, *, heartbeat_seconds: float = HEARTBEAT_SECONDS, answer_seconds: float = ANSWER_SECONDS
    ) -> None:
        self._url = database_url
        self._heartbeat_seconds = heartbeat_seconds
        self._answer_seconds = answer_seconds
        #: called on the event loop with the ids of ended cases ([] after a reconnection: any may have)
        self.on_cases: list[Callable[[list[uuid.UUID]], None]] = []
        #: called on the event loop when a connection that was listening is lost: until one is open
        #: again, a case's end may go unheard
        self.on_lost: list[Callable[[], None]] = []
        #: called from the listening thread at once: a key may have been revoked (or the thread lost track)
        self.on_keys_changed: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._lock = threading.Lock()
        self._fd: int | None = None  # the listening connection's socket while connected
        #: set from reading the socket (a wake-up, or a heartbeat's exchange) until what was read is
        #: handled: notifications then sit in the connection, off the socket, unheard (:meth:`unheard`)
        self._exchanging = threading.Event()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def unheard(self) -> bool:
        """True when the connection holds notifications the thread has not taken yet (or cannot be
        asked): a key check must not trust the cache until they are heard. One zero-timeout
        ``poll``, a few microseconds; it closes most of the moment between a revocation's commit
        and the thread's turn on a busy machine."""
        fd = self._fd
        if fd is None or self._exchanging.is_set():
            return True
        try:
            return _poller(fd).poll(0) != []
        except (OSError, ValueError):
            return True

    def start(self) -> None:
        """Start listening (from the event loop), unless already started."""
        thread = self._thread
        if thread is not None and thread.is_alive() and not self._stop.is_set():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
                return
            self._loop = asyncio.get_running_loop()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dermq-listener", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def _cases_ended(self, case_ids: list[uuid.UUID]) -> None:
        self._on_loop(self.on_cases, case_ids)

    def _on_loop(self, callbacks: list[Callable[..., None]], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for callback in callbacks:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback, *args)

    def _keys_changed(self) -> None:
        for callback in self.on_keys_changed:
            callback()

    def _connect(self) -> psycopg2.extensions.connection:
        url = make_url(self._url)
        args = url.translate_connect_args(username="user", database="dbname")
        options = {k: v for k, v in url.query.items() if isinstance(v, str)}
        # asynchronous (always autocommit): no call waits on the socket but through _answered's deadline
        connection = psycopg2.connect(**args, **options, application_name="dermq-listener", async_=True)
        try:
            self._answered(connection)
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {announcements.CHANNEL}; LISTEN {announcements.KEYS_CHANNEL}")
                self._answered(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _answered(self, connection: psycopg2.extensions.connection) -> None:
        """Drive ``connection`` until what it sent is answered; TimeoutError after the answer's
        deadline. Notifications that come meanwhile are kept on ``connection.notifies``."""
        deadline = time.monotonic() + self._answer_seconds
        while (state := connection.poll()) != psycopg2.extensions.POLL_OK:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Postgres did not answer the listener in time")
            if self._stop.is_set():  # close() waits for this thread: no answer is waited for then
                raise InterruptedError("the listener is stopping")
            poller = select.poll()  # the descriptor may change while a connection is being made
            poller.register(
                connection.fileno(), select.POLLOUT if state == psycopg2.extensions.POLL_WRITE else select.POLLIN
            )
            poller.poll(min(remaining, 0.5) * 1000)

    def _heartbeat(self, connection: psycopg2.extensions.connection) -> None:
        """Ask ``SELECT 1`` and wait for its answer. :meth:`unheard` is True from here until the
        caller has handled the notifications read meanwhile (it clears ``_exchanging``)."""
        self._exchanging.set()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            self._answered(connection)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            connection = None
            try:
                connection = self._connect()
                self._fd = connection.fileno()
                # whatever changed while nobody listened: forgotten before anything may trust the
                # cache again (KeyCache.unchanged_since, a key remembered during the outage)
                self._keys_changed()
                self._listening.set()
                backoff = 0.5
                self._cases_ended([])
                poller = _poller(self._fd)
                quiet_since = time.monotonic()
                while not self._stop.is_set():
                    if not poller.poll(min(1.0, self._heartbeat_seconds) * 1000):
                        if time.monotonic() - quiet_since >= self._heartbeat_seconds:
                            self._heartbeat(connection)
                            quiet_since = time.monotonic()
                        else:
                            continue
                    else:
                        self._exchanging.set()  # read off the socket, not yet handled: unheard
                        connection.poll()
                        quiet_since = time.monotonic()
                    ended: list[uuid.UUID] = []
                    keys_changed = False
                    while connection.notifies:
                        notice = connection.notifies.pop(0)
                        if notice.channel == announcements.KEYS_CHANNEL:
                            keys_changed = True
                        else:
                            ended += announcements.parse(notice.payload)
                    if keys_changed:
                        self._keys_changed()
                    self._exchanging.clear()  # what was read is handled
                    if ended:
                        self._cases_ended(ended)
            except Exception as exc:
                if not self._stop.is_set() and (self._listening.is_set() or backoff == 0.5):
                    log.warning(
                        "the Postgres listener is not connected; key checks go to the database and waiting "
                        "requests look every second until it is",
                        extra={"event": "listener_lost", "error": type(exc).__name__},
                    )
            finally:
                lost = self._listening.is_set()
                self._listening.clear()
                self._fd = None
                self._keys_changed()
                self._exchanging.clear()  # last: the cache has been told, and unheard() sees no socket
                if lost:
                    self._on_loop(self.on_lost)
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()
            if not self._stop.wait(backoff):  # close() does not wait out a back-off
                backoff = min(backoff * 2, 10.0)


def _poller(fd: int) -> select.poll:
    """A ``poll`` object watching ``fd`` for something to read (errors and hang-ups are reported
    whatever is asked). Not ``select``: it refuses a descriptor numbered 1024 or more, which an API
    process holding many connections reaches, and the listener would never connect."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller
