"""SSRF through DNS: a callback host whose answer mixes public and private addresses (a rebinding
setup, or a name an attacker controls) is refused at delivery, whichever address comes first."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from core.callback_urls import UnsafeAddress, checked_address
from core.config import Settings

PUBLIC, PRIVATE, METADATA, LOOPBACK6 = "93.184.215.14", "10.0.0.7", "169.254.169.254", "::1"


def answer(*addresses: str) -> Any:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses
        ]

    return getaddrinfo


@pytest.mark.parametrize(
    "addresses",
    [
        (PUBLIC, PRIVATE),
        (PRIVATE, PUBLIC),
        (PUBLIC, METADATA),
        (PUBLIC, LOOPBACK6),
        ("::ffff:10.0.0.7",),
        ("fec0::1",),  # site-local
        ("::ffff:0:a9fe:a9fe",),  # SIIT to the metadata service
    ],
)
def test_an_answer_with_any_non_public_address_is_refused(monkeypatch: pytest.MonkeyPatch, addresses) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(socket, "getaddrinfo", answer(*addresses))
    with pytest.raises(UnsafeAddress):
        checked_address("hooks.example.org", 443, Settings(environment="production"))


def test_an_all_public_answer_connects_to_the_first_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", answer(PUBLIC, "93.184.215.15"))
    assert checked_address("hooks.example.org", 443, Settings(environment="production")) == PUBLIC
