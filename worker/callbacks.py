"""Delivering completion callbacks: the worker's HTTP client and one attempt at a case's callback.

One attempt (:func:`deliver`) never holds a row lock or a pooled database connection while the
clinic's server answers: it leases the outbox row in a short transaction and commits
(:func:`core.callbacks.lease`), posts the signed notice with no transaction open, then records the
answer in a second short transaction fenced by the attempt number
(:func:`core.callbacks.record_attempt`).

The POST refuses non-public addresses outside development and test (SSRF,
:mod:`core.callback_urls`), connects to the very address it checked, follows no redirects, bounds
every step by ``callback_timeout_seconds`` and reads at most 1 KiB of the answer.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import uuid
from urllib.parse import urlsplit

from core import callbacks
from core.callback_signing import EVENT_HEADER, SIGNATURE_HEADER, sign
from core.callback_urls import checked_address
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope

USER_AGENT = "dermq-callback/1"


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Talks to ``address`` (checked) while naming ``host`` in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to ``address`` (checked) and verifies the certificate for ``host`` (SNI too)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)


def post(url: str, body: bytes, secret: str, settings: Settings, *, event_id: str) -> tuple[int | None, str | None]:
    """POST the signed ``body``; returns (HTTP status or None, error class name or None). No redirects."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    try:
        address = checked_address(host, port, settings)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host the resolver refuses to encode
        return None, type(exc).__name__
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_type = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    connection = connection_type(host, port, address, settings.callback_timeout_seconds)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event_id,
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
    }
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read(1024)
        return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, type(exc).__name__
    finally:
        connection.close()


def deliver(config: Settings, keyring: Keyring, case_id: uuid.UUID) -> callbacks.Delivery:
    """Make the next attempt at a case's pending callback: lease, POST, record (see the module docstring)."""
    with session_scope(config) as session:
        held = callbacks.lease(session, settings=config, keyring=keyring, case_id=case_id)
    if held is None:
        return callbacks.Delivery("skipped")
    status: int | None = None
    error: str | None = "DecryptionError"  # no secret: nothing can be signed, no retry can help
    if held.secret is not None:
        status, error = post(held.url, held.body, held.secret, config, event_id=str(case_id))
    with session_scope(config) as session:
        return callbacks.record_attempt(session, settings=config, lease=held, http_status=status, error=error)
