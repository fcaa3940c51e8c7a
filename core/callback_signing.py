"""The signature of a completion callback, and how a receiver checks it.

    Dermq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>[,v1=...]
    Dermq-Event-Id: <case id>

:func:`verify` is the reference for receivers: the signature matches, and its timestamp is within
:data:`SIGNATURE_TOLERANCE_SECONDS` of now (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "Dermq-Signature"
EVENT_HEADER = "Dermq-Event-Id"
#: A receiver should refuse signatures older (or newer) than this.
SIGNATURE_TOLERANCE_SECONDS = 300


def sign(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 over "<t>." + body>``: one ``v1`` for each of several
    secrets, in their order (a rotated secret and the one it replaced: :mod:`core.callback_secrets`)."""
    keys = [secret] if isinstance(secret, str) else list(secret)
    signed = f"{timestamp}.".encode() + body
    return ",".join(
        [f"t={timestamp}", *(f"v1={hmac.new(k.encode(), signed, hashlib.sha256).hexdigest()}" for k in keys)]
    )


def verify(
    secret: str, header: str, body: bytes, *, at: float | None = None, tolerance: int = SIGNATURE_TOLERANCE_SECONDS
) -> bool:
    """What a receiver does: the signature matches and its timestamp is recent."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    stamp = fields.get("t", [""])[0]
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):  # int() takes other digits, any length
        return False
    timestamp = int(stamp)
    if abs((time.time() if at is None else at) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]  # one secret: one value
    # compare_digest refuses str holding non-ASCII characters, which a sender may put there
    return any(hmac.compare_digest(expected, value) for value in fields.get("v1", []) if value.isascii())
