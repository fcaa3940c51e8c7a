"""Callback URL rules (SSRF) and signatures, without a database: what a clinic may register, what
delivery refuses to connect to, and the signature a receiver verifies."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from core.callback_signing import sign, verify
from core.callback_urls import validate_url
from core.config import Settings
from core.errors import InvalidInput
from worker.callbacks import post

PRODUCTION = Settings(environment="production")


@pytest.mark.parametrize(
    "url",
    [
        "https://portal.example-clinic.org/dermq/callback",
        "https://portal.example-clinic.org:8443/hook?tenant=7",
        "https://93.184.215.14/hook",
        "https://[64:ff9b::5db8:d70e]/hook",  # NAT64 to 93.184.215.14
        "https://[2002:5db8:d70e::1]/hook",  # 6to4 from 93.184.215.14
        "https://cafe.de/hook",  # a name made of hexadecimal letters is still a name
        "https://xn--bcher-praxis-dlb.de/hook",  # an international name, in punycode
        "https://portal_1.example-clinic.org/hook",  # DNS serves it; registered before, it must keep working
        "https://93.0xb8.55310/hook",  # an older spelling of a public address: the resolver's to read
    ],
)
def test_public_https_urls_are_accepted_in_production(url: str) -> None:
    assert validate_url(f"  {url} ", PRODUCTION) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://portal.example-clinic.org/hook", "https"),
        ("ftp://portal.example-clinic.org/hook", "https"),
        ("https://user:secret@portal.example-clinic.org/hook", "credentials"),
        ("https://token@portal.example-clinic.org/hook", "credentials"),
        ("https://portal.example-clinic.org/" + "a" * 2100, "characters"),
        ("https://portal.example-clinic.org/hook#x", "fragment"),
        ("https://portal.example-clinic.org:99999/hook", "port"),
        ("https://portal.example-clinic.org:0/hook", "port"),  # accepted, and every delivery failed
        ("https://93.184.215.14:00/hook", "port"),
        ("https://portal.exämple.org/hook", "ASCII"),
        ("https://portal.example-clinic.org/ho ok", "spaces"),
        ("https://localhost/hook", "public"),
        ("https://metadata.google.internal/computeMetadata/v1/", "public"),
        ("https://intranet/hook", "public"),
        ("https://127.0.0.1/hook", "public"),
        ("https://10.1.2.3/hook", "public"),
        ("https://192.168.0.10/hook", "public"),
        ("https://169.254.169.254/latest/meta-data/", "public"),
        ("https://100.64.0.1/hook", "public"),
        ("https://[::1]/hook", "public"),
        ("https://[fd00::1]/hook", "public"),
        ("https://[::ffff:127.0.0.1]/hook", "public"),
        ("https://224.0.0.1/hook", "public"),
        # IPv6 addresses that carry a private IPv4 one
        ("https://[64:ff9b::7f00:1]/hook", "public"),  # NAT64 to 127.0.0.1
        ("https://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "public"),  # NAT64 to the metadata service
        ("https://[64:ff9b:1::5db8:d70e]/hook", "public"),  # local-use NAT64: the operator's translator
        ("https://[2002:a00:1::1]/hook", "public"),  # 6to4 from 10.0.0.1
        ("https://[2002:7f00:1::1]/hook", "public"),  # 6to4 from 127.0.0.1
        ("https://[::7f00:1]/hook", "public"),  # IPv4-compatible 127.0.0.1
        ("https://[::a9fe:a9fe]/hook", "public"),  # IPv4-compatible 169.254.169.254
        ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook", "public"),  # Teredo, client 192.0.2.45
        ("https://[::ffff:0:a9fe:a9fe]/hook", "public"),  # SIIT to the metadata service
        # IPv6 outside global unicast: site-local (still routed on some networks) and reserved blocks
        ("https://[fec0::1]/hook", "public"),
        ("https://[fe00::1]/hook", "public"),
        ("https://[4000::1]/hook", "public"),
        ("https://[8000::1]/hook", "public"),
        # inet_aton's older spellings, which resolvers read as addresses: accepted once as names
        ("https://127.1/hook", "public"),
        ("https://0x7f.1/hook", "public"),
        ("https://017700000001/hook", "public"),
        ("https://10.1/hook", "public"),
        ("https://0xa9.0xfe.0xa9.0xfe/latest/meta-data/", "public"),  # the metadata service
        # names the resolver refuses: accepted once, they failed every delivery with an exception
        ("https://a..example-clinic.org/hook", "valid DNS name"),
        ("https://.example-clinic.org/hook", "valid DNS name"),
        ("https://" + "a" * 64 + ".example-clinic.org/hook", "valid DNS name"),
        # characters the resolver passes on but no host name has (accepted before, checked only by length)
        ("https://10.0.0.1%2e/hook", "valid DNS name"),
        ("https://127.0.0.1%00.example.com/hook", "valid DNS name"),
        ("https://-portal.example-clinic.org/hook", "valid DNS name"),
        ("https:///hook", "host"),
        ("https://[::1/hook", "host is not valid"),  # urlsplit raises for these two
        ("https://[zz]/hook", "host is not valid"),
        ("not a url", "absolute URL"),
        ("portal.example-clinic.org/hook", "absolute URL"),
    ],
)
def test_unsafe_urls_are_refused_in_production(url: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why) as refused:
        validate_url(url, PRODUCTION)
    assert refused.value.code == "invalid_callback_url"


def test_plain_http_to_this_machine_must_be_asked_for_and_never_in_production() -> None:
    allowed = {"callback_allow_private_urls": True}
    assert validate_url("http://127.0.0.1:8080/hook", Settings(environment="test", **allowed))
    assert validate_url("http://localhost:8080/hook", Settings(environment="development", **allowed))
    for environment in ("development", "test"):  # the environment alone relaxes nothing
        with pytest.raises(InvalidInput, match="https"):
            validate_url("http://127.0.0.1:8080/hook", Settings(environment=environment))
    with pytest.raises(ValidationError, match="SSRF"):
        Settings(environment="production", **allowed)


def test_delivery_never_connects_to_a_private_address_in_production() -> None:
    # Checked again at delivery time, after resolution (a public name may resolve to 127.0.0.1).
    status, error = post("https://localhost:9/hook", b'{"case_id":"x"}', "whsec_x", PRODUCTION, event_id="x")
    assert (status, error) == (None, "UnsafeAddress")


def test_public_addresses_stay_callable() -> None:
    for url in (
        "https://portal.example-clinic.org/hook",
        "https://93.184.215.14/hook",
        "https://[2606:4700:4700::1111]/hook",
        "https://[64:ff9b::5db8:d70e]/hook",  # NAT64 to a public IPv4 address (DNS64 networks)
        "https://[2002:5db8:d70e::1]/hook",  # 6to4 from a public IPv4 address
    ):
        assert validate_url(url, PRODUCTION) == url


def test_a_host_the_resolver_refuses_fails_its_delivery_attempt() -> None:
    # a URL stored before registration checked its labels: the attempt is recorded, not raised
    status, error = post("https://a..example-clinic.org/hook", b'{"case_id":"x"}', "whsec_x", PRODUCTION, event_id="x")
    assert status is None and error == "UnicodeError"


def test_signatures_verify_and_refuse_tampering_replay_and_other_secrets() -> None:
    body = b'{"case_id":"c","status":"succeeded"}'
    now = int(time.time())
    header = sign("whsec_one", body, now)
    assert header.startswith(f"t={now},v1=") and len(header.rpartition("v1=")[2]) == 64
    assert verify("whsec_one", header, body)
    assert not verify("whsec_two", header, body)
    assert not verify("whsec_one", header, body.replace(b"succeeded", b"failed"))
    stale = sign("whsec_one", body, now - 3600)
    assert not verify("whsec_one", stale, body)
    assert not verify("whsec_one", "v1=deadbeef", body)
