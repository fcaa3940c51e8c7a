"""Verify a completion callback exactly as dermq signs it::

    Dermq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>[,v1=...]
    Dermq-Event-Id: <case id>

For a while after a rotation (registering the callback again) the header has a ``v1`` value for the
replaced secret too, before the new one's. A signature matches when one of its ``v1`` values equals
the HMAC of the raw body under one of the secrets given (compared in constant time) and its
timestamp is within ``tolerance`` seconds of now (replays are refused). Any other header
(non-ASCII, garbage, missing parts) is refused with :class:`InvalidSignature` too: the
sender is not authenticated yet, so nothing it sends may raise anything else."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence

from dermq_client.errors import InvalidSignature
from dermq_client.models import CallbackNotice, _time

SIGNATURE_HEADER = "Dermq-Signature"
EVENT_HEADER = "Dermq-Event-Id"
TOLERANCE_SECONDS = 300
#: what dermq sends: unix seconds, and lowercase hex SHA-256 (ASCII only, so compare_digest accepts them)
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[0-9a-f]{64}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def verify_callback(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | bytes | Sequence[str | bytes],
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> CallbackNotice:
    """The notice of a callback whose signature verifies; :class:`InvalidSignature` otherwise.

    ``headers``: the request's headers (any mapping; names in any case). ``body``: the raw body,
    exactly as received (not re-serialised JSON). ``secret``: what registering the callback showed, or
    several (the new one and the one it replaced, while your configuration changes to a rotated one)."""
    header = _header(headers, SIGNATURE_HEADER)
    if not header:
        raise InvalidSignature(f"no {SIGNATURE_HEADER} header")
    if not isinstance(header, str):  # a framework that hands over raw bytes
        raise InvalidSignature(f"the {SIGNATURE_HEADER} header is not text")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    keys = [
        one.encode() if isinstance(one, str) else bytes(one)
        for one in ([secret] if isinstance(secret, (str, bytes, bytearray, memoryview)) else list(secret))
    ]
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    stamp = fields.get("t", [""])[0]
    if not _TIMESTAMP.fullmatch(stamp):
        raise InvalidSignature("the signature has no valid timestamp")
    timestamp = int(stamp)
    signed = f"{timestamp}.".encode() + raw
    expected = [hmac.new(key, signed, hashlib.sha256).hexdigest() for key in keys]
    candidates = [value for value in fields.get("v1", []) if _MAC.fullmatch(value)]
    if not any(hmac.compare_digest(mac, candidate) for mac in expected for candidate in candidates):
        raise InvalidSignature("the signature does not match the body")
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise InvalidSignature("the signature's timestamp is too old (or in the future)")
    try:
        notice = json.loads(raw)
    except ValueError:
        raise InvalidSignature("the signed body is not JSON") from None
    if not isinstance(notice, dict) or "case_id" not in notice:
        raise InvalidSignature("the signed body is not a dermq notice")
    event_id = _header(headers, EVENT_HEADER)
    if event_id is not None and event_id != str(notice["case_id"]):
        # the header is not signed: one that disagrees with the signed body was altered on the way,
        # and a receiver deduplicating on it would take a replayed notice for a new one
        raise InvalidSignature(f"the {EVENT_HEADER} header does not name the signed body's case")
    return CallbackNotice(
        type=str(notice.get("type", "")),
        case_id=str(notice["case_id"]),
        status=str(notice.get("status", "")),
        outcome=notice.get("outcome"),
        timestamp=_time(notice.get("timestamp")),
        event_id=event_id,
        raw=notice,
    )
