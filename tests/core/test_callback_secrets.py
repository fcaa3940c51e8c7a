"""A rotated callback secret and those it replaced: each replaced one signs while its overlap lasts,
the new one alone after; rotated again within an overlap, the secret in force longest keeps signing;
the previous ones are sealed beside the current one with their overlaps' ends, so a key rotation's
re-wrap of the row's one wrapped key keeps them readable and a database writer cannot extend an
overlap; one that will not open signs nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from core import callback_secrets
from core.crypto import Keyring, rewrap_key
from core.errors import KeyNotHeld
from core.models import ClinicCallback

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def registered(
    keyring: Keyring,
    clinic_id: uuid.UUID,
    secret: str,
    replaced: ClinicCallback | None = None,
    *,
    at: datetime = T0,
    overlap: float = 24.0,
) -> ClinicCallback:
    values, _ = callback_secrets.sealed(keyring, clinic_id, secret, replaced=replaced, at=at, overlap=overlap)
    return ClinicCallback(clinic_id=clinic_id, url="https://portal.example/hook", **values)


def test_the_replaced_secret_signs_first_until_the_overlap_ends(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    first = registered(keyring, clinic, "whsec_old")
    assert callback_secrets.signing(keyring, first, T0) == ("whsec_old",)
    values, rotation = callback_secrets.sealed(keyring, clinic, "whsec_new", replaced=first, at=T0, overlap=24)
    rotated = ClinicCallback(clinic_id=clinic, url="https://portal.example/hook", **values)
    assert rotation.detail() == {"rotated": True, "previous_signs_until": "2026-12-07T09:00:00+00:00"}
    assert rotated.previous_secret_until == T0 + 24 * HOUR
    assert b"whsec_old" not in rotated.previous_secret_ciphertext  # type: ignore[operator]
    assert callback_secrets.signing(keyring, rotated, T0 + 23 * HOUR) == ("whsec_old", "whsec_new")
    assert callback_secrets.signing(keyring, rotated, T0 + 24 * HOUR) == ("whsec_new",)


def test_rotated_again_within_the_overlap_every_replaced_secret_still_signs(keyring: Keyring) -> None:
    # The portal installed B; then a rotation to C whose answer was lost, retried (D): the portal holds
    # B, never saw C, and A is the one before it
    clinic = uuid.uuid4()
    a = registered(keyring, clinic, "whsec_a")
    b = registered(keyring, clinic, "whsec_b", a, at=T0)
    c = registered(keyring, clinic, "whsec_c", b, at=T0 + HOUR)
    assert callback_secrets.signing(keyring, c, T0 + 2 * HOUR) == ("whsec_a", "whsec_b", "whsec_c")
    assert callback_secrets.signing(keyring, c, T0 + 24 * HOUR) == ("whsec_b", "whsec_c")  # A's own overlap ended
    d = registered(keyring, clinic, "whsec_d", c, at=T0 + 2 * HOUR)
    assert callback_secrets.signing(keyring, d, T0 + 3 * HOUR) == ("whsec_a", "whsec_b", "whsec_c", "whsec_d")
    later = T0 + 24 * HOUR + HOUR / 2  # A's overlap is over by now, B's (replaced at T0 + 1 h) not
    after = registered(keyring, clinic, "whsec_e", d, at=later)
    assert callback_secrets.signing(keyring, after, later) == ("whsec_b", "whsec_c", "whsec_d", "whsec_e")
    # past the cap, the oldest go first
    rows = [after]
    for n in range(5):
        rows.append(registered(keyring, clinic, f"whsec_{n}", rows[-1], at=T0 + 26 * HOUR))
    signing = callback_secrets.signing(keyring, rows[-1], T0 + 26 * HOUR)
    assert signing == ("whsec_0", "whsec_1", "whsec_2", "whsec_3", "whsec_4")  # four replaced, then the current


def test_no_overlap_when_it_is_set_to_zero(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    first = registered(keyring, clinic, "whsec_old")
    values, rotation = callback_secrets.sealed(keyring, clinic, "whsec_new", replaced=first, at=T0, overlap=0)
    assert values["previous_secret_ciphertext"] is None and values["previous_secret_until"] is None
    assert rotation.detail() == {"rotated": True, "previous_signs_until": None, "previous_dropped": "overlap_off"}
    rotated = ClinicCallback(clinic_id=clinic, url="https://portal.example/hook", **values)
    assert callback_secrets.signing(keyring, rotated, T0) == ("whsec_new",)


def test_a_database_writer_cannot_extend_an_overlap(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    rotated = registered(keyring, clinic, "whsec_new", registered(keyring, clinic, "whsec_old"))
    rotated.previous_secret_until = T0 + 1000 * HOUR  # the column is a copy; the sealed end decides
    assert callback_secrets.signing(keyring, rotated, T0 + 25 * HOUR) == ("whsec_new",)


def test_a_key_rotation_rewrap_keeps_both_readable(keyring: Keyring) -> None:
    clinic = uuid.uuid4()
    rotated = registered(keyring, clinic, "whsec_new", registered(keyring, clinic, "whsec_old"))
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
    rotated = registered(keyring, clinic, "whsec_new", registered(keyring, clinic, "whsec_old"))
    sealed = rotated.previous_secret_ciphertext
    assert sealed is not None
    rotated.previous_secret_ciphertext = bytes([sealed[0] ^ 1]) + sealed[1:]
    assert callback_secrets.signing(keyring, rotated, T0) == ("whsec_new",)
    # nor one moved to another clinic's row: each is bound to its clinic
    other = registered(keyring, uuid.uuid4(), "whsec_other")
    source = registered(keyring, clinic, "whsec_new", registered(keyring, clinic, "whsec_old"))
    other.previous_secret_ciphertext = source.previous_secret_ciphertext
    other.previous_secret_nonce = source.previous_secret_nonce
    other.previous_secret_until = T0 + HOUR
    assert callback_secrets.signing(keyring, other, T0) == ("whsec_other",)


def test_a_replaced_secret_under_a_key_not_held_refuses_the_registration_for_now(keyring: Keyring) -> None:
    # as every read of sealed data does while a key rotation rolls out: the caller retries (503
    # key_unavailable), rather than the overlap being dropped without a word
    clinic = uuid.uuid4()
    first = registered(keyring.with_new_active_key(), clinic, "whsec_old")
    with pytest.raises(KeyNotHeld):
        callback_secrets.sealed(keyring, clinic, "whsec_new", replaced=first, at=T0, overlap=24)
