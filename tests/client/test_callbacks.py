"""verify_callback accepts exactly what the server signs (core.callback_signing) and nothing else."""

from __future__ import annotations

import time
import uuid

import pytest
from dermq_client import InvalidSignature, verify_callback

from core import callback_signing

SECRET = "whsec-test-" + uuid.uuid4().hex


CASE_ID = "0d5c0000-0000-4000-8000-000000000000"


def signed(body: bytes, at: int | None = None) -> dict[str, str]:
    """The headers the server sends with ``body`` (its event id is the case's id: worker.callbacks)."""
    timestamp = int(time.time()) if at is None else at
    return {
        callback_signing.SIGNATURE_HEADER: callback_signing.sign(SECRET, body, timestamp),
        callback_signing.EVENT_HEADER: str(uuid.UUID(CASE_ID)),
    }


def notice_body(case_id: str = CASE_ID) -> bytes:
    return (
        f'{{"case_id":"{case_id}","outcome":"diagnosis","status":"succeeded",'
        '"timestamp":"2026-11-26T10:00:00.123456Z","type":"case.finished"}'
    ).encode()


def test_a_notice_signed_by_the_server_verifies() -> None:
    body = notice_body()
    headers = signed(body)
    notice = verify_callback(headers, body, SECRET)
    assert notice.case_id == "0d5c0000-0000-4000-8000-000000000000"
    assert (notice.type, notice.status, notice.outcome) == ("case.finished", "succeeded", "diagnosis")
    assert notice.event_id == headers[callback_signing.EVENT_HEADER]
    assert notice.timestamp is not None and notice.timestamp.year == 2026
    # header names in any case, the body as text, the secret as bytes
    lower = {k.lower(): v for k, v in headers.items()}
    assert verify_callback(lower, body.decode(), SECRET.encode()).case_id == notice.case_id


@pytest.mark.parametrize(
    "tamper",
    [
        lambda body, headers, secret: (body.replace(b"succeeded", b"failed\x20\x20"), headers, secret),
        lambda body, headers, secret: (body + b" ", headers, secret),
        lambda body, headers, secret: (body, headers, secret + "x"),
        lambda body, headers, secret: (
            body,
            {**headers, "Dermq-Signature": headers["Dermq-Signature"][:-1] + "0"}
            if not headers["Dermq-Signature"].endswith("0")
            else {**headers, "Dermq-Signature": headers["Dermq-Signature"][:-1] + "1"},
            secret,
        ),
        lambda body, headers, secret: (body, {"Dermq-Event-Id": "x"}, secret),
        lambda body, headers, secret: (body, {"Dermq-Signature": "v1=abc"}, secret),
        # the event id is not signed: one that names another case was altered (a replay made to look new)
        lambda body, headers, secret: (body, {**headers, "Dermq-Event-Id": str(uuid.uuid4())}, secret),
    ],
    ids=["body", "trailing_byte", "secret", "mac", "no_header", "no_timestamp", "event_id"],
)
def test_a_tampered_notice_is_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    body = notice_body()
    assert callback_signing.verify(SECRET, signed(body)[callback_signing.SIGNATURE_HEADER], body)
    bad_body, bad_headers, bad_secret = tamper(body, signed(body), SECRET)
    with pytest.raises(InvalidSignature):
        verify_callback(bad_headers, bad_body, bad_secret)


def test_an_old_signature_is_refused_as_a_replay() -> None:
    body = notice_body()
    old = signed(body, at=int(time.time()) - 301)
    with pytest.raises(InvalidSignature, match="too old"):
        verify_callback(old, body, SECRET)
    assert verify_callback(old, body, SECRET, tolerance=400).status == "succeeded"
    future = signed(body, at=int(time.time()) + 301)
    with pytest.raises(InvalidSignature):
        verify_callback(future, body, SECRET)


def test_a_signature_with_several_v1_values_verifies_if_one_matches() -> None:
    body = notice_body()
    header = signed(body)[callback_signing.SIGNATURE_HEADER]
    assert verify_callback({"Dermq-Signature": header.replace(",v1=", ",v1=deadbeef,v1=")}, body, SECRET)


@pytest.mark.parametrize(
    "header",
    [
        "t={now},v1=é",  # latin-1 decoded by the framework: compare_digest refused non-ASCII str
        "t={now},v1=" + "é" * 64,
        "t=١٧٠٠٠٠٠٠٠٠,v1=" + "0" * 64,  # digits int() accepts, but not ASCII
        "t=" + "9" * 4000 + ",v1=" + "0" * 64,  # an int too large for a float
        "t={now},v1=",
        "t={now}",
        "t=,v1=abc",
        "garbage",
        ",,,===",
        "\x00\xff",
    ],
)
def test_a_malformed_signature_header_is_refused_as_invalid(header: str) -> None:
    body = notice_body()
    with pytest.raises(InvalidSignature):
        verify_callback({"Dermq-Signature": header.format(now=int(time.time()))}, body, SECRET)
    assert not callback_signing.verify(SECRET, header.format(now=int(time.time())), body)  # the reference too


def test_the_client_and_the_documented_verifier_accept_either_secret_after_a_rotation() -> None:
    # docs/API.md's example is what portals copy: it must accept a rotation's two signatures (one for
    # each secret), the new secret's alone, and refuse the rest without raising
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(import hashlib, hmac, re, time\n.*?def valid\(.*?)```", text, re.S)
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/API.md", "exec"), namespace)  # the documentation's own example
    valid = namespace["valid"]
    old, new, body, now = "whsec_old", "whsec_new", notice_body(), int(time.time())
    both = callback_signing.sign([old, new], body, now)
    for secret in (old, new):
        assert valid(secret.encode(), both, body)  # type: ignore[operator]
        verify_callback({callback_signing.SIGNATURE_HEADER: both, callback_signing.EVENT_HEADER: CASE_ID}, body, secret)
    assert valid(new.encode(), callback_signing.sign(new, body, now), body)  # type: ignore[operator]
    for header in (
        both,  # another secret
        callback_signing.sign([old, new], body, now - 600),  # stale
        f"t={now},t={now},v1=" + "0" * 64,
        "v1=,t=",
        "",
        "t=1e3,v1=zz",
    ):
        assert not valid(b"whsec_other", header, body)  # type: ignore[operator]
    with pytest.raises(InvalidSignature):
        verify_callback({callback_signing.SIGNATURE_HEADER: both, callback_signing.EVENT_HEADER: CASE_ID}, body, "x")
    # a receiver still changing over accepts either secret it holds, whichever signs
    for header in (both, callback_signing.sign(new, body, now), callback_signing.sign(old, body, now)):
        headers = {callback_signing.SIGNATURE_HEADER: header, callback_signing.EVENT_HEADER: CASE_ID}
        assert verify_callback(headers, body, [new, old.encode()]).case_id == CASE_ID
    # one secret, however it is held: not read as a sequence of secrets
    for held in (new.encode(), bytearray(new.encode()), memoryview(new.encode())):
        assert verify_callback({callback_signing.SIGNATURE_HEADER: both}, body, held).case_id == CASE_ID
    with pytest.raises(InvalidSignature):
        verify_callback(
            {callback_signing.SIGNATURE_HEADER: callback_signing.sign(old, body, now)}, body, ["whsec_x", new]
        )
