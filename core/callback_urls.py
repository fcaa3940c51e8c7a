"""Which callback URLs dermq will call (SSRF rules), checked at registration and again at delivery.

The clinic chooses the URL, but the request leaves from dermq's worker network, where it could reach
what no clinic may: cloud metadata (169.254.169.254), Postgres, Redis, Flower, admin interfaces on
localhost. Outside development and test dermq therefore accepts only ``https`` URLs without
credentials, refuses hosts that are, or resolve to, anything but public unicast addresses (loopback,
private, link-local, shared, reserved, multicast), and resolves again at every delivery
(:func:`checked_address`), where the HTTP client (:mod:`worker.callbacks`) connects to the very
address checked, so DNS rebinding between check and connect gains nothing. Egress filtering at the
network layer is still recommended as a second wall.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import InvalidInput

#: Plain http and loopback/private receivers are allowed only here (a portal on the developer's machine).
LOCAL_ENVIRONMENTS = ("development", "test")
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")


class UnsafeAddress(OSError):
    """The callback host resolves to an address dermq must not call (see the module docstring)."""


def public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether dermq may call ``address``: a public unicast address (an IPv4-mapped IPv6 one judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_callback_url")


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
            if not public_address(literal):
                raise _invalid("the callback host must be a public address, not a private or local one")
    return url


def checked_address(host: str, port: int, settings: Settings) -> str:
    """The address to connect to for ``host``, resolved now; :class:`UnsafeAddress` if any address it
    resolves to is not public (outside development and test)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeAddress("no address")
    if settings.environment not in LOCAL_ENVIRONMENTS and not all(
        public_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses
    ):
        raise UnsafeAddress("the host resolves to a non-public address")
    return addresses[0]
