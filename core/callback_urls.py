"""Which callback URLs dermq will call (SSRF rules), checked at registration and again at delivery.

The clinic chooses the URL, but the request leaves from dermq's worker network, where it could reach
what no clinic may: cloud metadata (169.254.169.254), Postgres, Redis, Flower, admin interfaces on
localhost. Unless ``DERMQ_CALLBACK_ALLOW_PRIVATE_URLS`` is set (a portal on a developer's machine; refused in
production), dermq therefore accepts only ``https`` URLs without
credentials, refuses hosts that are, or resolve to, anything but public unicast addresses (loopback,
private, link-local, site-local, shared, reserved, multicast, IPv6 outside global unicast 2000::/3; an
IPv6 address that carries an IPv4 one, through NAT64, 6to4, Teredo, SIIT or the old IPv4-compatible
form, is judged by the IPv4 address it reaches) or are not valid DNS names, and
resolves again at every delivery
(:func:`checked_address`), where the HTTP client (:mod:`worker.callbacks`) connects to the very
address checked, so DNS rebinding between check and connect gains nothing. Egress filtering at the
network layer is still recommended as a second wall.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import InvalidInput

INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")


class UnsafeAddress(OSError):
    """The callback host resolves to an address dermq must not call (see the module docstring)."""


#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address a translator reaches.
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
#: NAT64 prefixes for local use (RFC 8215): they reach whatever the operator's translator reaches.
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
#: IPv4-compatible addresses (RFC 4291 section 2.5.5.1, deprecated): ::a.b.c.d.
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
#: IPv4-translated addresses (RFC 2765, SIIT): ::ffff:0:a.b.c.d.
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
#: IPv6 global unicast (RFC 4291): every public IPv6 address assigned is in it; the rest is reserved,
#: site-local (deprecated, still routed on some networks) or special-purpose.
IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def _carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses that packets to ``address`` end up at, where it embeds any."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in NAT64_WELL_KNOWN or address in IPV4_TRANSLATED or (address in IPV4_COMPATIBLE and int(address) > 1):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    return []


def public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether dermq may call ``address``: a public unicast address. An IPv6 address that embeds an IPv4
    one (mapped, NAT64, 6to4, Teredo, IPv4-compatible) is public only if every IPv4 one it carries is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL_USE:
            return False
        carried = _carried_ipv4(address)
        if carried:
            return all(public_address(v4) for v4 in carried)
        if address not in IPV6_GLOBAL_UNICAST:
            return False
    return address.is_global and not address.is_multicast and not address.is_reserved


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_callback_url")


def validate_url(url: str, settings: Settings) -> str:
    """The URL as dermq will call it, or :class:`InvalidInput` saying what is wrong with it."""
    url = url.strip()
    limit = settings.callback_url_max_length
    if not url or len(url) > limit:
        raise _invalid(f"the callback URL must be 1 to {limit} characters")
    if "://" not in url:
        raise _invalid("the callback URL must be an absolute URL such as https://portal.example.org/dermq/callback")
    if any(c.isspace() for c in url):
        raise _invalid("the callback URL must not contain spaces or line breaks (percent-encode them)")
    if any(not ("\x21" <= c <= "\x7e") for c in url):
        raise _invalid("the callback URL must be visible ASCII (write international host names in punycode)")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced or invalid [IPv6] host
        raise _invalid("the callback URL's host is not valid") from None
    local = settings.callback_allow_private_urls
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
        port = parts.port  # None where the URL names none; ValueError out of range or not a number
    except ValueError:
        port = 0
    if port == 0:  # no receiver listens on port 0: every delivery would fail
        raise _invalid("the callback URL's port is not valid")
    if not local:
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        # a literal address, or one in the older spellings resolvers read as addresses (127.1, 0x7f.1)
        address = literal if literal is not None else _legacy_ipv4(host)
        if address is not None and not public_address(address):
            raise _invalid("the callback host must be a public address, not a private or local one")
        if literal is None:  # a name (a public older spelling is judged as one too)
            if host.lower() == "localhost" or host.lower().endswith(INTERNAL_SUFFIXES) or "." not in host:
                raise _invalid("the callback host must be a public DNS name")
            if not _valid_dns_name(host):
                raise _invalid(
                    "the callback host is not a valid DNS name "
                    "(labels of 1 to 63 letters, digits, hyphens and underscores)"
                )
    return url


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address of a host written in one of inet_aton's older forms (fewer than four parts,
    hexadecimal or octal parts), or None for a name; the resolver reads such hosts as addresses."""
    if not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _valid_dns_name(host: str) -> bool:
    """A host name: labels of 1 to 63 letters, digits, hyphens and underscores (an international name in
    punycode, as the URL's check asks; an underscore is not a host name's, but DNS serves it and URLs
    registered before this check may hold one), not starting or ending with a hyphen, 253 characters
    in all. The resolver would take more (``%``, a NUL), none of it a name a server answers to."""
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def checked_address(host: str, port: int, settings: Settings) -> str:
    """The address to connect to for ``host``, resolved now; :class:`UnsafeAddress` if any address it
    resolves to is not public (unless private URLs are allowed)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeAddress("no address")
    if not settings.callback_allow_private_urls and not all(
        public_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses
    ):
        raise UnsafeAddress("the host resolves to a non-public address")
    return addresses[0]
