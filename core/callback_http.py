"""How a completion callback travels: its signature, and a POST that cannot be turned against dermq's
own network.

Signature: ``Dermq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``;
:func:`verify` is what a receiver does.

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
import socket
import ssl
import time
from urllib.parse import urlsplit

from core.config import Settings

SIGNATURE_HEADER = "Dermq-Signature"
EVENT_HEADER = "Dermq-Event-Id"
#: A receiver should refuse signatures older (or newer) than this.
SIGNATURE_TOLERANCE_SECONDS = 300
#: Plain http and loopback/private receivers are allowed only here (a portal on the developer's machine).
LOCAL_ENVIRONMENTS = ("development", "test")
USER_AGENT = "dermq-callback/1"


def public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether dermq may call ``address``: a public unicast address (an IPv4-mapped IPv6 one judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


# --------------------------------------------------------------------------- signing


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


# --------------------------------------------------------------------------- the POST


class UnsafeAddress(OSError):
    """The callback host resolves to an address dermq must not call (see the module docstring)."""


def _resolve(host: str, port: int, *, allow_private: bool) -> str:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeAddress("no address")
    if not allow_private and not all(public_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
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
