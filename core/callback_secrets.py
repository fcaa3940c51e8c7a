"""A clinic's callback signing secrets at rest: the current one, and for a while the one it replaced.

Registering a callback again (``PUT /v1/clinic/callback``) rotates its secret. A portal cannot take
the new secret into its configuration at the very moment dermq starts signing with it: until it has,
every callback would fail its check and be retried, then given up. So the secret a registration
replaces keeps signing beside the new one for ``callback_secret_overlap_hours`` (24 by default; 0:
not at all): ``Dermq-Signature: t=<t>,v1=<previous>,v1=<current>``, and a receiver accepts the
notice if any ``v1`` matches a secret it holds (:func:`core.callback_signing.verify`; the Python
client's ``verify_callback``). The current secret's signature comes last: a receiver that reads only
one ``v1`` value, the last, checks the new secret's.

Both are sealed under one data key (kind ``callback_secret``, bound to the clinic): the current secret
as a blob, the previous one beside it (:func:`core.crypto.seal_beside`), so that a key rotation's
re-wrap of the one wrapped key keeps both readable. A secret that will not open signs nothing.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from core.crypto import Keyring, decrypt_blob, encrypt_blob, open_beside, seal_beside
from core.errors import DecryptionError, KeyNotHeld
from core.models import ClinicCallback

SECRET_KIND = "callback_secret"  # noqa: S105 - the blob kind, not a secret
PREVIOUS = "previous"


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def current(keyring: Keyring, row: ClinicCallback) -> str:
    """The clinic's current secret; :class:`DecryptionError` if it does not open."""
    return decrypt_blob(keyring, row.sealed_secret, case_id=row.clinic_id, kind=SECRET_KIND).decode()


def sealed(
    keyring: Keyring,
    clinic_id: uuid.UUID,
    secret: str,
    *,
    replaced: ClinicCallback | None,
    at: datetime,
    overlap: float,
) -> dict[str, Any]:
    """The columns of a registration whose secret is ``secret``: with the secret of the registration it
    ``replaced`` still signing until ``overlap`` hours after ``at`` (none with an overlap of 0, or when
    that secret does not open here: it could sign nothing anyway, and a registration is not refused for
    a key that has not reached this process yet)."""
    blob = encrypt_blob(keyring, secret.encode(), case_id=clinic_id, kind=SECRET_KIND)
    values: dict[str, Any] = {
        "secret_ciphertext": blob.ciphertext,
        "secret_nonce": blob.nonce,
        "secret_wrapped_key": blob.wrapped_key,
        "kek_id": blob.kek_id,
        "previous_secret_ciphertext": None,
        "previous_secret_nonce": None,
        "previous_secret_until": None,
    }
    if replaced is None or overlap <= 0:
        return values
    try:
        previous = current(keyring, replaced)
    except (DecryptionError, KeyNotHeld):
        return values
    ciphertext, nonce = seal_beside(
        keyring, blob, previous.encode(), case_id=clinic_id, kind=SECRET_KIND, part=PREVIOUS
    )
    values.update(
        previous_secret_ciphertext=ciphertext,
        previous_secret_nonce=nonce,
        previous_secret_until=at + timedelta(hours=overlap),
    )
    return values


def signing(keyring: Keyring, row: ClinicCallback, at: datetime) -> tuple[str, ...]:
    """The secrets that sign a callback sent at ``at``: the previous one while its overlap lasts and it
    opens, then the current one; none if the current one does not open (nothing can be signed)."""
    try:
        secret = current(keyring, row)
    except DecryptionError:
        return ()
    if (
        row.previous_secret_ciphertext is None
        or row.previous_secret_nonce is None
        or row.previous_secret_until is None
        or row.previous_secret_until <= at
    ):
        return (secret,)
    try:
        previous = open_beside(
            keyring,
            row.sealed_secret,
            row.previous_secret_ciphertext,
            row.previous_secret_nonce,
            case_id=row.clinic_id,
            kind=SECRET_KIND,
            part=PREVIOUS,
        ).decode()
    except DecryptionError:
        return (secret,)
    return (previous, secret)
