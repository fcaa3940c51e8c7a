"""A clinic's callback signing secrets at rest: the current one, and for a while those it replaced.

Registering a callback again (``PUT /v1/clinic/callback``) rotates its secret. A portal cannot take
the new secret into its configuration at the very moment dermq starts signing with it: until it has,
every callback would fail its check and be retried, then given up. So the secret a registration
replaces keeps signing beside the new one for ``callback_secret_overlap_hours`` (24 by default; 0:
not at all): ``Dermq-Signature: t=<t>,v1=<previous>,v1=<current>``, and a receiver accepts the
notice if any ``v1`` matches a secret it holds (:func:`core.callback_signing.verify`; the Python
client's ``verify_callback``). The current secret's signature comes last: a receiver that reads only
one ``v1`` value, the last, checks the new secret's. ``DELETE /v1/clinic/callback/previous-secret``
ends the overlap early (:func:`end_overlap`).

Rotated again within the overlap (a PUT whose answer was lost, then retried), the secret the portal
holds may be any of those replaced, not the one just replaced, which it may never have seen: each
keeps signing until its own overlap ends (at most :data:`MAX_PREVIOUS` of them, the oldest dropped
first past that).

Everything is sealed under one data key (kind ``callback_secret``, bound to the clinic): the current
secret as a blob, and the previous ones beside it in one payload (:func:`core.crypto.seal_beside`)
with the end of each one's overlap, so a key rotation's re-wrap of the one wrapped key keeps them all
readable, and a database writer can neither extend an overlap nor move a secret to another clinic.
``previous_secret_until``, the last of those ends, is a copy to show and to find expired ones by. A
previous secret that will not open signs nothing.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from core.crypto import Keyring, decrypt_blob, encrypt_blob, open_beside, seal_beside
from core.errors import DecryptionError
from core.models import ClinicCallback

SECRET_KIND = "callback_secret"  # noqa: S105 - the blob kind, not a secret
PREVIOUS = "previous"
#: replaced secrets that sign beside the current one at most (a v1 value of 68 bytes each)
MAX_PREVIOUS = 4
#: the columns of a registration without previous secrets
NO_PREVIOUS: dict[str, Any] = {
    "previous_secret_ciphertext": None,
    "previous_secret_nonce": None,
    "previous_secret_until": None,
}


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a registration did to the secrets it replaced, for its audit event (no secret in it)."""

    rotated: bool
    #: when the last replaced secret stops signing; None when none signs
    previous_signs_until: datetime | None = None
    #: why the replaced secret does not sign: ``overlap_off`` or ``undecryptable``
    dropped: str | None = None

    def detail(self) -> dict[str, Any]:
        if not self.rotated:
            return {}
        until = self.previous_signs_until
        return {
            "rotated": True,
            "previous_signs_until": None if until is None else until.isoformat(timespec="seconds"),
            **({"previous_dropped": self.dropped} if self.dropped else {}),
        }


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def current(keyring: Keyring, row: ClinicCallback) -> str:
    """The clinic's current secret; :class:`DecryptionError` if it does not open (and
    :class:`core.errors.KeyNotHeld` for a key that has not reached this process: retried)."""
    return decrypt_blob(keyring, row.sealed_secret, case_id=row.clinic_id, kind=SECRET_KIND).decode()


def previous(keyring: Keyring, row: ClinicCallback) -> list[tuple[str, datetime]]:
    """The replaced secrets sealed in ``row``, oldest first, each with the end of its overlap (expired
    ones too); none if they do not open."""
    if row.previous_secret_ciphertext is None or row.previous_secret_nonce is None:
        return []
    try:
        plain = open_beside(
            keyring,
            row.sealed_secret,
            row.previous_secret_ciphertext,
            row.previous_secret_nonce,
            case_id=row.clinic_id,
            kind=SECRET_KIND,
            part=PREVIOUS,
        )
        return [(str(e["secret"]), datetime.fromtimestamp(int(e["until"]), UTC)) for e in json.loads(plain)]
    except (DecryptionError, ValueError, KeyError, TypeError, OverflowError, OSError):
        return []


def sealed(
    keyring: Keyring,
    clinic_id: uuid.UUID,
    secret: str,
    *,
    replaced: ClinicCallback | None,
    at: datetime,
    overlap: float,
) -> tuple[dict[str, Any], Rotation]:
    """The columns of a registration whose secret is ``secret``, and what it did to the secrets of the
    registration it ``replaced``: that one's current secret signs beside it until ``overlap`` hours
    after ``at``, and so do its previous ones until their own ends (none with an overlap of 0, or when
    that secret does not open: it could sign nothing anyway). :class:`core.errors.KeyNotHeld`
    when the replaced secret is under a key that has not reached this process (the caller retries)."""
    blob = encrypt_blob(keyring, secret.encode(), case_id=clinic_id, kind=SECRET_KIND)
    values: dict[str, Any] = {
        "secret_ciphertext": blob.ciphertext,
        "secret_nonce": blob.nonce,
        "secret_wrapped_key": blob.wrapped_key,
        "kek_id": blob.kek_id,
        **NO_PREVIOUS,
    }
    if replaced is None:
        return values, Rotation(rotated=False)
    if overlap <= 0:
        return values, Rotation(rotated=True, dropped="overlap_off")
    try:
        replaced_secret = current(keyring, replaced)
    except DecryptionError:
        return values, Rotation(rotated=True, dropped="undecryptable")
    until = (at + timedelta(hours=overlap)).replace(microsecond=0)  # as sealed: whole seconds
    still = [(old, ends) for old, ends in previous(keyring, replaced) if ends > at]
    kept = [*still, (replaced_secret, until)][-MAX_PREVIOUS:]  # oldest first: past the cap, the oldest go
    payload = json.dumps([{"secret": old, "until": int(ends.timestamp())} for old, ends in kept]).encode()
    ciphertext, nonce = seal_beside(keyring, blob, payload, case_id=clinic_id, kind=SECRET_KIND, part=PREVIOUS)
    last = max(ends for _, ends in kept)
    values.update(previous_secret_ciphertext=ciphertext, previous_secret_nonce=nonce, previous_secret_until=last)
    return values, Rotation(rotated=True, previous_signs_until=last)


def overlap_until(row: ClinicCallback, at: datetime) -> datetime | None:
    """When the last replaced secret still signing at ``at`` stops; None when none does."""
    until = row.previous_secret_until
    return until if until is not None and until > at else None


def signing(keyring: Keyring, row: ClinicCallback, at: datetime) -> tuple[str, ...]:
    """The secrets that sign a callback sent at ``at``: the previous ones whose overlap lasts, oldest
    first, then the current one; none if the current one does not open (nothing can be signed)."""
    try:
        secret = current(keyring, row)
    except DecryptionError:
        return ()
    if overlap_until(row, at) is None:
        return (secret,)
    return (*(old for old, ends in previous(keyring, row) if ends > at), secret)
