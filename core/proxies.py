"""Which proxies the API believes about a client's address (``DERMQ_FORWARDED_ALLOW_IPS``).

A proxy named there may say, in ``X-Forwarded-For``, which address a request came from: the address
its rate limits and failed-login limits count and its audit events record. Naming every address
lets any client that reaches the API directly choose its own, so production refuses it: ``*``, and
any network that holds more than a /8 of IPv4 or of IPv6 (``0.0.0.0/0``, ``0.0.0.0/1`` beside
``128.0.0.0/1``, ``::/0``), IPv4-mapped IPv6 (``::ffff:0:0/96``, every IPv4 client as a dual-stack
socket sees it) counted as the IPv4 it maps. A proxy's real range is far smaller: nginx's address,
an ingress's pod network (a /8 at most, such as ``10.0.0.0/8`` or ``fd00::/8``).
"""

from __future__ import annotations

import ipaddress

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
#: the most addresses a trusted network may hold: a /8 of IPv4 (2**24), a /8 of IPv6 (2**120)
_LARGEST = {4: 2**24, 6: 2**120}


def trusts_every_client(item: str) -> bool:
    """Whether ``item`` (an address, a network or ``*``) names more than a proxy's range could be."""
    if item == "*":
        return True
    network = ipaddress.ip_network(item, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(_MAPPED):
        if network.prefixlen < _MAPPED.prefixlen:  # all of the mapped IPv4, and more
            return True
        return network.num_addresses > _LARGEST[4]  # the IPv4 part it maps
    return network.num_addresses > _LARGEST[network.version]
