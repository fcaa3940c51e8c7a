"""Delivering completion callbacks: the worker's HTTP client and one attempt at a case's callback.

One attempt (:func:`deliver`) never holds a row lock or a pooled database connection while the
clinic's server answers: it leases the outbox row in a short transaction and commits
(:func:`core.callback_attempts.lease`), connects to the clinic's server with no transaction open,
takes a last look at the case, its clinic and its callback in a short transaction that stays open
only while the request is handed to the socket (:func:`core.callback_attempts.last_look`: a case
erased, a clinic deactivated or a callback removed since the lease gets no notice, and an erasure,
deactivation or removal that comes then waits until the notice is out), reads the answer
with no transaction open, then records it in a third short transaction fenced by the attempt number
(:func:`core.callback_attempts.record_attempt`).

The POST refuses non-public addresses outside development and test (SSRF,
:mod:`core.callback_urls`), connects to the very address it checked, follows no redirects, bounds
every step by ``callback_timeout_seconds`` and the whole exchange by three times that (a server that
answers a byte at a time never lets a step time out: its socket is shut down under it at the
deadline), and reads at most 1 KiB of the answer.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import callback_attempts, callback_pacing
from core.callback_signing import EVENT_HEADER, SIGNATURE_HEADER, sign
from core.callback_urls import checked_address, validate_url
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.enqueue import enqueue
from core.errors import InvalidInput
from core.models import CallbackDelivery
from core.publisher import callback_task

log = logging.getLogger("dermq.callbacks")

USER_AGENT = "dermq-callback/1"
#: the error an attempt records when the whole exchange outlasted three timeouts
DEADLINE_EXCEEDED = "DeadlineExceeded"
#: the error audited for a delivery given up because its URL is no longer one dermq calls
URL_REFUSED = "url_refused"
#: the error :func:`post` returns when its gate kept the request back (nothing was sent)
NOT_SENT = "not_sent"


class _Deadline:
    """Shuts down the socket of an exchange still running ``seconds`` after :meth:`start`."""

    def __init__(self, seconds: float) -> None:
        self.passed = threading.Event()
        self.socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def finish(self) -> None:
        """The exchange is over: no cut from now on (it waits for one under way), before its socket
        closes and its descriptor's number can be given to another."""
        with self._lock:
            self._finished = True
        self._timer.cancel()

    def opened(self, sock: socket.socket) -> None:
        """The exchange's socket, once connected: shut down at once if the deadline has passed."""
        self.socket = sock
        if self.passed.is_set():
            self._cut()

    def _cut(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.passed.set()
            if self.socket is None:
                return
            # Shut the connection down through a duplicate of its descriptor: the blocked read or write
            # on the original returns at once, whatever object owns it (a TLS socket's own shutdown
            # would pull its TLS state from under the thread reading it).
            with contextlib.suppress(OSError):  # closed already (a descriptor of -1 cannot be duplicated)
                duplicate = socket.fromfd(self.socket.fileno(), self.socket.family, self.socket.type)
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                finally:
                    duplicate.close()


def _connected(address: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection that sends at once, as http.client's own connect makes it: http.client
    writes the body apart from the head, and with Nagle's algorithm the body would wait for the
    receiver's delayed acknowledgement of the head (40 ms on Linux, up to 200 ms elsewhere)."""
    sock = socket.create_connection((address, port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Talks to ``address`` (checked) while naming ``host`` in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.deadline = deadline

    def connect(self) -> None:
        self.sock = _connected(self.address, self.port, self.timeout)
        self.deadline.opened(self.sock)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to ``address`` (checked) and verifies the certificate for ``host`` (SNI too)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: _Deadline) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address
        self.deadline = deadline

    def connect(self) -> None:
        raw = _connected(self.address, self.port, self.timeout)
        self.deadline.opened(raw)
        # wrapping takes the descriptor over from ``raw``: the deadline watches the TLS socket from
        # then on, the handshake included (hence the handshake after it, not inside the wrap)
        tls = self.tls.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = tls
        self.deadline.opened(tls)
        tls.do_handshake()


class _ResolveTimeout(Exception):
    """The callback's host was not resolved within one timeout."""


def _resolved(host: str, port: int, settings: Settings) -> str:
    """:func:`checked_address`, given at most one timeout: ``getaddrinfo`` has none of its own (a
    clinic's name server that drops queries holds it for the resolver's retries, 30 s and more) and
    cannot be interrupted, so it runs in a thread of its own, left behind if it overruns."""
    outcome: list[str | BaseException] = []
    done = threading.Event()

    def resolve() -> None:
        try:
            outcome.append(checked_address(host, port, settings))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        done.set()

    threading.Thread(target=resolve, name="callback-resolve", daemon=True).start()
    if not done.wait(settings.callback_timeout_seconds):
        raise _ResolveTimeout
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def post(
    url: str,
    body: bytes,
    secret: str | Sequence[str],
    settings: Settings,
    *,
    event_id: str,
    gate: Callable[[], AbstractContextManager[bool]] | None = None,
) -> tuple[int | None, str | None]:
    """POST ``body`` signed with ``secret`` (or each of several, in order); returns (HTTP status or None,
    error class name or None). No redirects. ``gate``: entered once the connection is made, just
    before the request is written, and left once it is, before the answer is read; when it yields
    False nothing is sent, and the answer is (None, :data:`NOT_SENT`)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    began = time.monotonic()
    try:
        address = _resolved(host, port, settings)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host the resolver refuses to encode
        return None, type(exc).__name__
    except _ResolveTimeout:
        return None, DEADLINE_EXCEEDED
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_type = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    deadline = _Deadline(3 * settings.callback_timeout_seconds - (time.monotonic() - began))
    connection = connection_type(host, port, address, settings.callback_timeout_seconds, deadline)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event_id,
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
    }
    deadline.start()
    try:
        connection.connect()  # before the gate: whatever it holds is not held while a host is reached
        with gate() if gate is not None else contextlib.nullcontext(True) as go:
            if not go:
                return None, NOT_SENT
            connection.request("POST", target, body=body, headers=headers)  # into the socket's buffer
        response = connection.getresponse()
        if deadline.passed.is_set():  # the deadline shut the socket mid-answer: a status line cut short
            return None, DEADLINE_EXCEEDED  # at its end reads as a whole one, and is no answer
        with contextlib.suppress(OSError, http.client.HTTPException):  # the status has come: that decides
            response.read(1024)
        return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, DEADLINE_EXCEEDED if deadline.passed.is_set() else type(exc).__name__
    finally:
        deadline.finish()
        connection.close()


def deliver(
    config: Settings,
    keyring: Keyring,
    case_id: uuid.UUID,
    *,
    publisher: Celery,
    after: int | None = None,
    turn: bool = False,
    held_looks: int = 0,
) -> callback_attempts.Delivery:
    """Make the next attempt at a case's pending callback: lease, POST, record (see the module
    docstring). ``after``: the attempts the message expects made (:func:`core.callback_attempts.lease`).
    Nothing is attempted while the clinic's receiver has its fill of attempts under way
    (``deferred``), before a retry is due (``early``) or while another transaction holds the row
    (``held``, its message back after :func:`core.callback_pacing.held_seconds`; ``held_too_long``
    once the message has found it held at every look it may take, ``held_looks`` of them before this
    one: left to the sweeper). A callback whose case was erased (or whose clinic or callback is
    gone) is ``cancelled``, at its lease or, if that happened since, at the last look before the
    request is written: nothing is sent. One whose clinic registered its callback again since the lease
    (a new URL, a new secret) is ``reregistered`` at that look: nothing is sent, the attempt is given
    back, and the message leases it again at once with the registration as it is now. An attempt that
    ends hands its turn to the clinic's oldest waiting callback, whose message ``publisher`` sends
    (:mod:`core.callback_pacing`); that message (``turn``), finding nothing to do (its callback taken,
    done or cancelled meanwhile, or handed the same turn twice), hands the turn on in its place."""
    with session_scope(config) as session:
        held = callback_attempts.lease(session, settings=config, keyring=keyring, case_id=case_id, after=after)
        if turn and (held is None or isinstance(held, (callback_attempts.Held, callback_attempts.Cancelled))):
            row = session.get(CallbackDelivery, case_id)
            if row is not None:
                _hand_on(session, publisher, row.clinic_id)
            held = held if isinstance(held, callback_attempts.Cancelled) else None
    if isinstance(held, callback_attempts.Cancelled):
        return callback_attempts.Delivery("cancelled", held.attempts)
    if isinstance(held, callback_attempts.Held):  # its own message looks again, whatever the holder does
        seconds = callback_pacing.held_seconds(config, held_looks + 1)
        if seconds is None:  # not a transaction of dermq's (theirs are short): the sweeper's, once it lets go
            return callback_attempts.Delivery("held_too_long", after or 0)
        return callback_attempts.Delivery("held", after or 0, retry_in=seconds)
    if held is None:
        return callback_attempts.Delivery("skipped")
    if isinstance(held, callback_pacing.Busy):
        return callback_attempts.Delivery("deferred", held.attempts)
    if isinstance(held, callback_pacing.NotDue):
        return callback_attempts.Delivery("early", after or 0, retry_in=held.seconds)
    status: int | None = None
    error: str | None = "DecryptionError"  # no secret: nothing can be signed, no retry can help
    refused = False
    try:
        # the URL as today's settings judge it: one registered while private receivers were allowed
        # (a developer's portal) is not called once they are not, whatever its address resolves to
        validate_url(held.url, config)
    except InvalidInput:
        error, refused = URL_REFUSED, True
    if held.secrets and not refused:
        look = _LastLook(config, publisher, held)
        try:
            status, error = post(held.url, held.body, held.secrets, config, event_id=str(case_id), gate=look)
        except SQLAlchemyError as exc:  # the last look's transaction failed (its lock wait timed out, an
            # erasure holding the case): an error as a network one is, retried
            status, error = None, type(exc).__name__
        if look.stopped is not None:  # erased, deactivated, removed or registered again since the lease:
            return look.stopped  # nothing sent
    with session_scope(config) as session:
        done = callback_attempts.record_attempt(
            session, settings=config, lease=held, http_status=status, error=error, hopeless=refused
        )
        if done.outcome != "skipped":  # this attempt's turn at the clinic's receiver has ended
            _hand_on(session, publisher, held.clinic_id)
    return done


class _LastLook:
    """The gate of one leased attempt's POST (:func:`post`): a transaction open from just before the
    request is written until it is, in which :func:`core.callback_attempts.last_look` holds the case,
    its clinic and its callback as they are; ``stopped`` is what the attempt came to when one of them
    was erased, deactivated, removed or registered again meanwhile."""

    def __init__(self, config: Settings, publisher: Celery, lease: callback_attempts.Lease) -> None:
        self.config, self.publisher, self.lease = config, publisher, lease
        self.stopped: callback_attempts.Delivery | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[bool]:
        with session_scope(self.config) as session:
            stopped = callback_attempts.last_look(session, lease=self.lease)
            if stopped is not None and stopped.outcome == "cancelled":  # its turn has ended
                _hand_on(session, self.publisher, self.lease.clinic_id)
            try:
                yield stopped is None
            finally:
                if stopped is None:
                    # the notice may go out: the look wrote nothing but its lock, so it ends in a
                    # rollback, which waits for no disk flush (an erasure waiting on the lock would wait
                    # for it too) and cannot fail once the request is out, as a commit could (the attempt
                    # then recorded an error and sent the notice again)
                    session.rollback()
        self.stopped = stopped  # once committed (else the attempt records the error, and its retry cancels)


def _hand_on(session: Session, publisher: Celery, clinic_id: uuid.UUID) -> None:
    """Send the message of the clinic's oldest callback waiting for a turn, once the record commits.
    In a savepoint: a failure here (a statement timeout) must not undo the attempt's record, or its
    POST would be made again; the waiting callback's own message comes back later instead."""
    try:
        with session.begin_nested():
            waiting = callback_pacing.next_waiting(session, clinic_id)
            if waiting is not None:
                enqueue(session, publisher, callback_task(waiting, turn=True))
    except SQLAlchemyError as exc:
        log.warning("callback turn not handed on", extra={"event": "callback_turn", "error": type(exc).__name__})
