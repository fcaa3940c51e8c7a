"""core.crypto: envelope encryption bound to case and kind, rotation re-wrap, and the key file."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
import uuid
from pathlib import Path

import pytest

from core.config import Settings
from core.crypto import (
    Keyring,
    KeyringSource,
    decrypt_blob,
    encrypt_blob,
    load_keyring,
    load_keyring_settled,
    rewrap,
    write_key_file,
)
from core.errors import DecryptionError, KeyNotHeld, KeyringError

PLAINTEXT = b"\xff\xd8\xff pretend these are the bytes of a dermoscopy image"


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


def test_round_trip_and_fresh_data_keys(keyring: Keyring) -> None:
    case = uuid.uuid4()
    first = encrypt_blob(keyring, PLAINTEXT, case_id=case, kind="image")
    second = encrypt_blob(keyring, PLAINTEXT, case_id=case, kind="image")
    assert PLAINTEXT not in first.ciphertext
    assert first.ciphertext != second.ciphertext and first.wrapped_key != second.wrapped_key
    assert decrypt_blob(keyring, first, case_id=case, kind="image") == PLAINTEXT


def test_blob_moved_to_another_case_or_kind_does_not_decrypt(keyring: Keyring) -> None:
    case = uuid.uuid4()
    sealed = encrypt_blob(keyring, PLAINTEXT, case_id=case, kind="image")
    with pytest.raises(DecryptionError):
        decrypt_blob(keyring, sealed, case_id=uuid.uuid4(), kind="image")
    with pytest.raises(DecryptionError):
        decrypt_blob(keyring, sealed, case_id=case, kind="heatmap")


def test_tampered_ciphertext_is_refused(keyring: Keyring) -> None:
    case = uuid.uuid4()
    sealed = encrypt_blob(keyring, PLAINTEXT, case_id=case, kind="image")
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(DecryptionError):
        decrypt_blob(
            keyring, type(sealed)(flipped, sealed.nonce, sealed.wrapped_key, sealed.kek_id), case_id=case, kind="image"
        )


@pytest.mark.parametrize("cut", ["nonce", "wrapped_key"])
def test_a_nonce_cut_short_is_a_blob_that_does_not_decrypt(keyring: Keyring, cut: str) -> None:
    """AES-GCM raises ValueError for a nonce under 8 bytes; callers handle DecryptionError (a case whose
    blob it is fails alone), so a ValueError used to take its batch, or a callback's lease, down with it."""
    case_id = uuid.uuid4()
    blob = encrypt_blob(keyring, b"lesion", case_id=case_id, kind="image")
    malformed = dataclasses.replace(blob, **{cut: getattr(blob, cut)[:5]})
    with pytest.raises(DecryptionError, match="cut short"):
        decrypt_blob(keyring, malformed, case_id=case_id, kind="image")


def test_rewrap_changes_only_the_wrapped_key(keyring: Keyring) -> None:
    case = uuid.uuid4()
    sealed = encrypt_blob(keyring, PLAINTEXT, case_id=case, kind="image")
    rotated = keyring.with_new_active_key()
    moved = rewrap(rotated, sealed, case_id=case, kind="image")
    assert moved.kek_id == rotated.active_id != sealed.kek_id
    assert moved.ciphertext == sealed.ciphertext and moved.nonce == sealed.nonce
    only_new = Keyring(rotated.active_id, {rotated.active_id: rotated.keks[rotated.active_id]}, rotated.api_key_pepper)
    assert decrypt_blob(only_new, moved, case_id=case, kind="image") == PLAINTEXT
    with pytest.raises(KeyNotHeld, match="does not hold"):  # not the data's fault: retried, never given up
        decrypt_blob(only_new, sealed, case_id=case, kind="image")


def test_key_file_is_private_and_round_trips(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "keys.json"
    write_key_file(path, keyring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keyring(Settings(key_file=path))
    assert loaded.active_id == keyring.active_id and loaded.keks == keyring.keks
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        write_key_file(path, Keyring.generate())


def test_missing_key_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="never invents keys"):
        load_keyring(Settings(key_file=tmp_path / "absent.json"))


@pytest.mark.parametrize("environment", ["production", "development", "test"])
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o460, 0o601])
def test_a_key_file_others_can_read_or_change_is_refused_everywhere(
    tmp_path: Path, keyring: Keyring, environment: str, mode: int
) -> None:
    path = tmp_path / "keys.json"
    write_key_file(path, keyring)
    os.chmod(path, mode)
    with pytest.raises(KeyringError, match="chmod 600"):
        load_keyring(Settings(key_file=path, environment=environment))


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440, 0o640])
def test_a_key_file_readable_by_its_group_only_is_accepted(tmp_path: Path, keyring: Keyring, mode: int) -> None:
    """Kubernetes mounts Secret files root:<fsGroup> 0440; the service reads them through its group."""
    path = tmp_path / "keys.json"
    write_key_file(path, keyring)
    os.chmod(path, mode)
    assert load_keyring(Settings(key_file=path, environment="production")).active_id == keyring.active_id


def test_malformed_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    for content, message in (
        ("nope", "not valid JSON"),
        ("{}", "must be a JSON object"),
        (json.dumps({"active": "a", "keys": {"a": "AAAA"}, "api_key_pepper": "x" * 24}), "bytes"),
    ):
        path.write_text(content)
        path.chmod(0o600)
        with pytest.raises(KeyringError, match=message):
            load_keyring(Settings(key_file=path))


def test_keys_never_appear_in_repr(keyring: Keyring) -> None:
    text = repr(keyring)
    assert all(key.hex() not in text for key in keyring.keks.values())


def test_a_key_file_being_written_in_place_leaves_the_last_keyring_serving(tmp_path: Path, keyring: Keyring) -> None:
    """deploy/README.md puts a rotated key file over a compose secret's with ``tee``, in place (the mount
    follows the inode), which empties the file before writing it: a running process that reads it then
    keeps the keyring it had, and takes the new file once it is whole. A broken file still stops a start."""
    path = tmp_path / "keys.json"
    write_key_file(path, keyring)
    source = KeyringSource(Settings(key_file=path))
    assert source.get().active_id == keyring.active_id
    rotated = keyring.with_new_active_key()
    whole = json.dumps(rotated.to_json()).encode()
    for torn in (b"", whole[: len(whole) // 2]):
        path.write_bytes(torn)
        assert source.get().active_id == keyring.active_id
        with pytest.raises(KeyringError, match="not valid JSON"):
            KeyringSource(Settings(key_file=path)).get()
    path.write_bytes(whole)
    assert source.get().active_id == rotated.active_id


def test_a_key_file_being_written_is_waited_for_where_a_process_must_read_it_now(
    tmp_path: Path, keyring: Keyring
) -> None:
    """A period key wrapped under a KEK this process does not hold yet, or a new period's key, makes it
    read the key file at once, with no keyring to fall back on: while ``tee`` writes the file it waits
    for the file to parse (a request failed for it), and a file that never does still fails."""
    path = tmp_path / "keys.json"
    write_key_file(path, keyring)
    whole = path.read_bytes()
    path.write_bytes(b"")
    finish = threading.Timer(0.3, path.write_bytes, [whole])
    finish.start()
    try:
        assert load_keyring_settled(Settings(key_file=path)).active_id == keyring.active_id
    finally:
        finish.join()
    path.write_bytes(whole[:10])
    with pytest.raises(KeyringError, match="not valid JSON"):
        load_keyring_settled(Settings(key_file=path), wait=0.2)
