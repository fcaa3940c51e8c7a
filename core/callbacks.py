"""Completion callbacks: a clinic registers one URL; when one of its cases ends (``succeeded`` or
``failed``), dermq POSTs a small signed notice there, so the portal need not poll.

    POST <url>
    Content-Type: application/json
    Dermq-Event-Id: <case id>
    Dermq-Signature: t=1764151200,v1=<hex HMAC-SHA256(secret, "1764151200." + body)>

    {"case_id":"...","status":"succeeded","timestamp":"2026-11-26T10:00:00.123456Z","type":"case.finished"}

The body carries no patient data: no client reference, no image, no probabilities. The portal then
reads the result with its API key (``GET /v1/cases/{id}``), an audited read like any other. The
receiver checks the signature with the secret it was shown once at registration (:func:`verify` is
the reference), refuses timestamps more than a few minutes old (replays) and de-duplicates by the
event id: delivery is at least once.

Delivery is durable. The outbox row (:class:`~core.models.CallbackDelivery`) is written in the
transaction that ends the case; a Celery task posts it, retrying with exponential backoff and
jitter, and audits every attempt (``callback.deliver``: attempt number and HTTP status, never the
body or the secret); the sweeper re-publishes rows whose message was lost. The signing secret is
stored sealed by envelope encryption (kind ``callback_secret``, bound to the clinic) and is never
logged.

SSRF. The clinic chooses the URL, but the request leaves from dermq's worker network, where it
could reach what no clinic may: cloud metadata (169.254.169.254), Postgres, Redis, Flower, admin
interfaces on localhost. Outside development and test dermq therefore accepts only ``https`` URLs
without credentials, refuses hosts that are, or resolve to, anything but public unicast addresses
(loopback, private, link-local, shared, reserved, multicast), resolves again at every delivery
and connects to the very address it checked (DNS rebinding between check and connect gains
nothing), follows no redirects, bounds the time and reads at most 1 KiB of the answer. Egress
filtering at the network layer is still recommended as a second wall.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import random
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import audit
from core.config import Settings
from core.crypto import Keyring, decrypt_blob, encrypt_blob
from core.errors import DecryptionError, Forbidden, InvalidInput, NotFound
from core.keys import Principal
from core.models import CallbackDelivery, CallbackStatus, Case, ClinicCallback, Role

SECRET_KIND = "callback_secret"  # noqa: S105 - the blob kind, not a secret
SIGNATURE_HEADER = "Dermq-Signature"
EVENT_HEADER = "Dermq-Event-Id"
#: A receiver should refuse signatures older (or newer) than this.
SIGNATURE_TOLERANCE_SECONDS = 300
#: Plain http and loopback/private receivers are allowed only here (a portal on the developer's machine).
LOCAL_ENVIRONMENTS = ("development", "test")
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")
USER_AGENT = "dermq-callback/1"


def now() -> datetime:
    return datetime.now(UTC)


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_callback_url")


def _clinic_of(principal: Principal, action: str) -> uuid.UUID:
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        raise Forbidden(
            f"a {principal.role.value} key cannot do this; use the clinic's own key",
            code="role_not_allowed",
            audit=audit.PendingEvent(action, audit.DENIED, "clinic", None, {"reason": "role"}),
        )
    return principal.clinic_id


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


# --------------------------------------------------------------------------- the URL


def validate_url(url: str, settings: Settings) -> str:
    """The URL as dermq will call it, or :class:`InvalidInput` saying what is wrong with it."""
    url = url.strip()
    limit = settings.callback_url_max_length
    if not url or len(url) > limit:
        raise _invalid(f"the callback URL must be 1 to {limit} characters")
    if any(not ("\x21" <= c <= "\x7e") for c in url):
        raise _invalid("the callback URL must be visible ASCII (write international host names in punycode)")
    parts = urlsplit(url)
    local = settings.environment in LOCAL_ENVIRONMENTS
    allowed = ("https", "http") if local else ("https",)
    if parts.scheme not in allowed:
        raise _invalid("the callback URL must use https")
    if "@" in parts.netloc:
        raise _invalid("the callback URL must not carry credentials; authenticate calls by their signature")
    if parts.fragment:
        raise _invalid("the callback URL must not have a #fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _invalid("the callback URL has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise _invalid("the callback URL's port is not valid") from None
    if not local:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if host.lower() == "localhost" or host.lower().endswith(INTERNAL_SUFFIXES) or "." not in host:
                raise _invalid("the callback host must be a public DNS name") from None
        else:
            if not _public(literal):
                raise _invalid("the callback host must be a public address, not a private or local one")
    return url


# --------------------------------------------------------------------------- registration (API)


def register(
    session: Session, *, keyring: Keyring, settings: Settings, principal: Principal, actor: audit.Actor, url: str
) -> tuple[ClinicCallback, str]:
    """Set (or replace) the clinic's callback URL with a new signing secret; returns (row, secret).

    The secret is returned here only: dermq stores it sealed and never shows it again. Registering
    again rotates it."""
    clinic_id = _clinic_of(principal, "callback.register")
    url = validate_url(url, settings)
    secret = "whsec_" + secrets.token_urlsafe(32)
    sealed = encrypt_blob(keyring, secret.encode(), case_id=clinic_id, kind=SECRET_KIND)
    values = {
        "url": url,
        "secret_ciphertext": sealed.ciphertext,
        "secret_nonce": sealed.nonce,
        "secret_wrapped_key": sealed.wrapped_key,
        "kek_id": sealed.kek_id,
        "updated_at": now(),
    }
    row = session.scalar(
        insert(ClinicCallback)
        .values(clinic_id=clinic_id, created_at=now(), **values)
        .on_conflict_do_update(index_elements=[ClinicCallback.clinic_id], set_=values)
        .returning(ClinicCallback),
        execution_options={"populate_existing": True},
    )
    assert row is not None
    audit.record(
        session,
        action="callback.register",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
        detail={"scheme": urlsplit(url).scheme},
    )
    return row, secret


def registered(session: Session, *, principal: Principal) -> ClinicCallback:
    clinic_id = _clinic_of(principal, "callback.read")
    row = session.get(ClinicCallback, clinic_id)
    if row is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    return row


def unregister(session: Session, *, principal: Principal, actor: audit.Actor) -> None:
    """Remove the callback; deliveries still pending are cancelled when their turn comes."""
    clinic_id = _clinic_of(principal, "callback.unregister")
    removed = session.scalar(
        delete(ClinicCallback).where(ClinicCallback.clinic_id == clinic_id).returning(ClinicCallback.clinic_id)
    )
    if removed is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    audit.record(
        session,
        action="callback.unregister",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
    )


# --------------------------------------------------------------------------- the outbox (worker, sweeper)


def note_finished(session: Session, case_id: uuid.UUID) -> bool:
    """Write the outbox row for a case that has just ended, if its clinic has a callback; True if it
    did. Call inside the transaction that ended the case, then publish after the commit."""
    return case_id in note_finished_many(session, [case_id])


def note_finished_many(session: Session, case_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """:func:`note_finished` for several cases in one statement; returns those given an outbox row."""
    if not case_ids:
        return set()
    return set(
        session.scalars(
            insert(CallbackDelivery)
            .from_select(
                ["case_id", "clinic_id"],
                select(Case.id, Case.clinic_id)
                .join(ClinicCallback, ClinicCallback.clinic_id == Case.clinic_id)
                .where(Case.id.in_(case_ids)),
            )
            .on_conflict_do_nothing()
            .returning(CallbackDelivery.case_id)
        )
    )


def stale_deliveries(session: Session, cutoff: datetime, limit: int = 500) -> list[uuid.UUID]:
    """Pending deliveries untouched since ``cutoff`` (their message was lost), locked for this sweep."""
    return list(
        session.scalars(
            select(CallbackDelivery.case_id)
            .where(CallbackDelivery.status == CallbackStatus.PENDING.value, CallbackDelivery.updated_at < cutoff)
            .order_by(CallbackDelivery.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def touch_deliveries(session: Session, case_ids: list[uuid.UUID]) -> None:
    """Mark deliveries as just published (the next stale check counts from now)."""
    if case_ids:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id.in_(case_ids)).values(updated_at=now()))


def stale_after_seconds(settings: Settings) -> float:
    """How long a pending delivery may sit untouched before the sweeper republishes it: longer than
    the longest backoff a retry may be waiting out, plus one request."""
    return 1.5 * settings.callback_backoff_max_seconds + settings.callback_timeout_seconds + 5


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Delay before attempt ``attempt + 1``: base * 2**(attempt-1), times a jitter in [0.5, 1.5), capped."""
    delay = settings.callback_backoff_seconds * 2.0 ** max(0, attempt - 1)
    return min(settings.callback_backoff_max_seconds, delay * (0.5 + random.random()))  # noqa: S311 - jitter


# --------------------------------------------------------------------------- signing


def notice(case: Case) -> bytes:
    """The JSON body: ids, state and time only."""
    finished = (case.finished_at or case.updated_at).astimezone(UTC)
    body = {
        "type": "case.finished",
        "case_id": str(case.id),
        "status": case.status,
        "timestamp": finished.isoformat(timespec="microseconds").replace("+00:00", "Z"),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 over "<t>." + body>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str, header: str, body: bytes, *, at: float | None = None, tolerance: int = SIGNATURE_TOLERANCE_SECONDS
) -> bool:
    """What a receiver does: the signature matches and its timestamp is recent."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if at is None else at) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


# --------------------------------------------------------------------------- delivery (worker)


class UnsafeAddress(OSError):
    """The callback host resolves to an address dermq must not call (see the module docstring)."""


def _resolve(host: str, port: int, *, allow_private: bool) -> str:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeAddress("no address")
    if not allow_private and not all(_public(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
        raise UnsafeAddress("the host resolves to a non-public address")
    return str(addresses[0])


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


def post(url: str, body: bytes, secret: str, settings: Settings) -> tuple[int | None, str | None]:
    """POST the signed ``body``; returns (HTTP status or None, error class name or None). No redirects."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    try:
        address = _resolve(host, port, allow_private=settings.environment in LOCAL_ENVIRONMENTS)
    except OSError as exc:
        return None, type(exc).__name__
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_type = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    connection = connection_type(host, port, address, settings.callback_timeout_seconds)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: json.loads(body)["case_id"],
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


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery attempt came to: ``delivered``, ``retry`` (later), ``failed`` (given up)
    or ``skipped`` (nothing pending, or another worker holds it)."""

    outcome: str
    attempt: int = 0
    http_status: int | None = None


def deliver(session: Session, *, settings: Settings, keyring: Keyring, case_id: uuid.UUID) -> Delivery:
    """Make the next attempt of a case's pending callback and audit it.

    The outbox row stays locked during the request, so a duplicated message waits for nothing and
    sends nothing twice (``skipped``). The audit event is written after the request: the chain's
    lock is held only for the commit, never while a clinic's server takes its time.
    """
    row = session.scalar(
        select(CallbackDelivery)
        .where(CallbackDelivery.case_id == case_id, CallbackDelivery.status == CallbackStatus.PENDING.value)
        .with_for_update(skip_locked=True)
    )
    if row is None:
        return Delivery("skipped")
    endpoint = session.get(ClinicCallback, row.clinic_id)
    case = session.get(Case, case_id)
    if endpoint is None or case is None:
        row.status, row.updated_at = CallbackStatus.CANCELLED.value, now()
        return Delivery("skipped")
    attempt = row.attempts + 1
    status: int | None
    error: str | None
    try:
        secret = decrypt_blob(
            keyring,
            endpoint.sealed_secret,
            case_id=row.clinic_id,
            kind=SECRET_KIND,
        ).decode()
    except DecryptionError:
        status, error = None, "DecryptionError"
        attempt = settings.callback_max_attempts  # no retry can help: the clinic must register again
    else:
        status, error = post(endpoint.url, notice(case), secret, settings)
        del secret
    delivered = status is not None and 200 <= status < 300
    row.attempts, row.last_http_status, row.updated_at = attempt, status, now()
    if delivered:
        row.status, row.delivered_at = CallbackStatus.DELIVERED.value, now()
    elif attempt >= settings.callback_max_attempts:
        row.status = CallbackStatus.FAILED.value
    session.flush()
    detail: dict[str, object] = {"attempt": attempt, "http_status": status}
    if error:
        detail["error"] = error
    audit.record(
        session,
        action="callback.deliver",
        outcome=audit.SUCCESS if delivered else audit.FAILURE,
        actor=audit.SYSTEM,
        entity_type="case",
        entity_id=case_id,
        clinic_id=row.clinic_id,
        detail=detail,
    )
    outcome = "delivered" if delivered else ("failed" if row.status == CallbackStatus.FAILED.value else "retry")
    return Delivery(outcome, attempt, status)
