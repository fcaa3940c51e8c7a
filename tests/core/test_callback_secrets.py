"""A rotated callback secret and the one it replaced: both sign while the overlap lasts, the new one
alone after it; the previous one is sealed beside the current one, so a key rotation's re-wrap of the
row's one wrapped key keeps both readable; one that will not open signs nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from core import callback_secrets
from core.crypto import Keyring, rewrap_key
from core.models import ClinicCallback

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def registered(
    keyring: Keyring, clinic_id: uuid.UUID, secret: str, replaced: ClinicCallback | None = None, overlap: float = 24.0
) -> ClinicCallback:
    values = callback_secrets.sealed(keyring, clinic_id, secret, replaced=replaced, at=T0, overlap=overlap)
    return ClinicCallback(clinic_id=clinic_id, url="https://portal.example/hook", **values)


def test_the_replaced_secret_signs_first_until_the_overlap_ends(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    first = registered(keyring, clinic, "whsec_old")
    assert callback_secrets.signing(keyring, first, T0) == ("whsec_old",)
    rotated = registered(keyring, clinic, "whsec_new", replaced=first)
    assert rotated.previous_secret_until == T0 + timedelta(hours=24)
    assert b"whsec_old" not in rotated.previous_secret_ciphertext  # type: ignore[operator]
    assert callback_secrets.signing(keyring, rotated, T0 + timedelta(hours=23)) == ("whsec_old", "whsec_new")
    assert callback_secrets.signing(keyring, rotated, T0 + timedelta(hours=24)) == ("whsec_new",)
    # rotated again within the overlap: the secret it replaces now is the one in force, not the oldest
    again = registered(keyring, clinic, "whsec_newer", replaced=rotated)
    assert callback_secrets.signing(keyring, again, T0) == ("whsec_new", "whsec_newer")


def test_no_overlap_when_it_is_set_to_zero(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    rotated = registered(keyring, clinic, "whsec_new", replaced=registered(keyring, clinic, "whsec_old"), overlap=0)
    assert rotated.previous_secret_ciphertext is None and rotated.previous_secret_until is None
    assert callback_secrets.signing(keyring, rotated, T0) == ("whsec_new",)


def test_a_key_rotation_rewrap_keeps_both_readable(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    rotated = registered(keyring, clinic, "whsec_new", replaced=registered(keyring, clinic, "whsec_old"))
    moved = keyring.with_new_active_key()
    # what core.keyrotation.rewrap_all does to the row: its one wrapped key, nothing else
    rotated.secret_wrapped_key = rewrap_key(
        moved, rotated.secret_wrapped_key, rotated.kek_id, case_id=clinic, kind=callback_secrets.SECRET_KIND
    )
    rotated.kek_id = moved.active_id
    only_new = Keyring(moved.active_id, {moved.active_id: moved.keks[moved.active_id]}, moved.api_key_pepper)
    assert callback_secrets.signing(only_new, rotated, T0) == ("whsec_old", "whsec_new")


def test_a_previous_secret_that_does_not_open_signs_nothing(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    rotated = registered(keyring, clinic, "whsec_new", replaced=registered(keyring, clinic, "whsec_old"))
    tampered = bytes([rotated.previous_secret_ciphertext[0] ^ 1]) + rotated.previous_secret_ciphertext[1:]  # type: ignore[index]
    rotated.previous_secret_ciphertext = tampered
    assert callback_secrets.signing(keyring, rotated, T0) == ("whsec_new",)
    # nor one moved to another clinic's row: each is bound to its clinic
    other = registered(keyring, uuid.uuid4(), "whsec_other")
    source = registered(keyring, clinic, "whsec_new", replaced=registered(keyring, clinic, "whsec_old"))
    other.previous_secret_ciphertext, other.previous_secret_nonce = (
        source.previous_secret_ciphertext,
        source.previous_secret_nonce,
    )
    other.previous_secret_until = T0 + timedelta(hours=1)
    assert callback_secrets.signing(keyring, other, T0) == ("whsec_other",)


def test_a_replaced_secret_under_a_key_not_held_is_not_carried(keyring: Keyring) -> None:
    # a registration is not refused because the old secret's key has not reached this process
    clinic = uuid.uuid4()
    elsewhere = keyring.with_new_active_key()
    first = registered(elsewhere, clinic, "whsec_old")
    rotated = registered(keyring, clinic, "whsec_new", replaced=first)
    assert rotated.previous_secret_ciphertext is None
    assert callback_secrets.signing(keyring, rotated, T0) == ("whsec_new",)
