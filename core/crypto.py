"""Envelope encryption at rest (AES-256-GCM) and the key file that holds the key-encryption keys.

Every blob gets a fresh 256-bit data key. The payload is sealed with it under associated data that
names the case and the kind of blob, so ciphertext copied to another row does not decrypt. The data
key is itself sealed ("wrapped") by a key-encryption key (KEK) named by id, under associated data
that again binds case and kind. A case's blobs are wrapped under the key of the period the case was
created in (ids ``period-...``, :mod:`core.period_keys`), which retention destroys; other secrets
(clinics' callback secrets) and the period keys themselves under the key file's active KEK.
Rotation re-wraps data keys under a new KEK without touching the payloads (:func:`rewrap`).
Plaintext exists only in memory.

The key file is JSON, mode 0600, never in git::

    {"version": 1, "active": "kek-20261126-1a2b", "keys": {"kek-20261126-1a2b": "<base64, 32 bytes>"},
     "api_key_pepper": "<base64, 32 bytes>"}
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.config import Settings, exposed_bits
from core.errors import DecryptionError, KeyFileUnfinished, KeyNotHeld, KeyringError

if TYPE_CHECKING:
    from core.period_keys import PeriodKeys

log = logging.getLogger("dermq.keys")
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16  # AES-GCM's
FORMAT = b"dermq/v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise KeyringError(f"{what} is not valid base64") from None


@dataclass(frozen=True)
class Keyring:
    active_id: str
    keks: dict[str, bytes] = field(repr=False)
    api_key_pepper: bytes = field(repr=False)
    #: the period-key folder (None: no period keys; case blobs are wrapped under ``active_id``)
    periods: PeriodKeys | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active_id not in self.keks:
            raise KeyringError(f"the active key {self.active_id!r} is not among the keys in the key file")
        for kek_id, key in self.keks.items():
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {kek_id!r} is {len(key)} bytes; AES-256 keys are {KEY_BYTES}")
        if len(self.api_key_pepper) < 16:
            raise KeyringError("api_key_pepper must be at least 16 bytes")

    def kek(self, kek_id: str) -> bytes | bytearray:
        if self.periods is not None and self.periods.owns(kek_id):
            return self.periods.key(self, kek_id)
        try:
            return self.keks[kek_id]
        except KeyError:
            raise KeyNotHeld(
                f"blob is wrapped under key {kek_id!r}, which the key file does not hold (not yet, or no "
                "longer): let a rotation's new key file reach every service, or restore the key removed "
                "before its rotation finished"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "active": self.active_id,
            "keys": {k: _b64(v) for k, v in self.keks.items()},
            "api_key_pepper": _b64(self.api_key_pepper),
        }

    @classmethod
    def from_json(cls, data: Any) -> Keyring:
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or "active" not in data:
            raise KeyringError("key file must be a JSON object with 'active', 'keys' and 'api_key_pepper'")
        if "api_key_pepper" not in data:
            raise KeyringError("key file has no 'api_key_pepper'")
        return cls(
            active_id=str(data["active"]),
            keks={str(k): _unb64(v, f"key {k!r}") for k, v in data["keys"].items()},
            api_key_pepper=_unb64(data["api_key_pepper"], "api_key_pepper"),
        )

    @classmethod
    def generate(cls) -> Keyring:
        kek_id = new_kek_id()
        return cls(kek_id, {kek_id: secrets.token_bytes(KEY_BYTES)}, secrets.token_bytes(KEY_BYTES))

    def with_new_active_key(self) -> Keyring:
        kek_id = new_kek_id()
        return Keyring(kek_id, {**self.keks, kek_id: secrets.token_bytes(KEY_BYTES)}, self.api_key_pepper)


def new_kek_id() -> str:
    return f"kek-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file, refused if others could read it or anyone but its owner could change
    it (:func:`core.config.exposed_bits`), in every environment. The mode checked is the opened file's
    own (``fstat``): a file swapped in between a check and a read is never read."""
    with path.open("rb") as handle:
        if (mode := exposed_bits(os.fstat(handle.fileno()).st_mode)) is not None:
            raise KeyringError(
                f"{what} {path} has mode {mode:o}: others may read or change it; chmod 600 it (or 440 with a "
                "group that only dermq's services use, as the Kubernetes manifests mount it)"
            )
        return handle.read()


def load_keyring(settings: Settings) -> Keyring:
    """The keyring from ``DERMQ_KEYS_JSON`` or ``DERMQ_KEY_FILE``; refuses to invent one."""
    if settings.keys_json is not None:
        try:
            return with_periods(Keyring.from_json(json.loads(settings.keys_json.get_secret_value())), settings)
        except json.JSONDecodeError:
            raise KeyringError("DERMQ_KEYS_JSON is not valid JSON") from None
    path = settings.key_file
    if path is None or not path.is_file():
        raise KeyringError(
            f"no encryption key file at {path}; create one with `dermq keys init` (make run does this "
            "the first time) or set DERMQ_KEY_FILE / DERMQ_KEYS_JSON. dermq never invents keys at start-up."
        )
    try:
        keyring = Keyring.from_json(json.loads(read_private_file(path, "key file")))
    except json.JSONDecodeError:
        raise KeyFileUnfinished(f"key file {path} is not valid JSON (empty or cut short?)") from None
    return with_periods(keyring, settings)


def load_keyring_settled(settings: Settings, *, wait: float = 2.0) -> Keyring:
    """:func:`load_keyring`, waiting up to ``wait`` seconds for a key file being written in place to
    parse (:class:`KeyringSource`): for a process that must read the file now, without a keyring to
    fall back on (a period key wrapped under a KEK it does not hold yet, a new period's key)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return load_keyring(settings)
        except KeyFileUnfinished:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def with_periods(keyring: Keyring, settings: Settings) -> Keyring:
    """``keyring`` with the period-key folder the settings name (if any)."""
    from core.period_keys import PeriodKeys

    folder = settings.period_key_folder
    if folder is None:
        return keyring
    return Keyring(keyring.active_id, keyring.keks, keyring.api_key_pepper, PeriodKeys(folder, settings))


class KeyringSource:
    """The keyring of a running process, re-read whenever the key file changes.

    ``dermq keys rotate`` writes a new active key into the file while the API and workers run; they
    pick it up on their next use (one ``stat`` per call), so new blobs are sealed under the new key
    and blobs re-wrapped by the rotation stay readable. A changed file that does not parse is one being
    written in place (deploy/README.md puts a rotated file over a compose secret's with ``tee``, which
    empties it first): the last keyring serves meanwhile, and the file is read again on every use until
    it parses (never taken as read: a write's stamp can come before its bytes).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keyring: Keyring | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._unfinished: tuple[int, int, int] | None = None  # the stamp last warned of

    def get(self) -> Keyring:
        path = self.settings.key_file
        if self.settings.keys_json is not None or path is None:
            if self._keyring is None:
                self._keyring = load_keyring(self.settings)
            return self._keyring
        try:
            info = path.stat()
        except FileNotFoundError:
            raise KeyringError(f"the key file {path} has disappeared") from None
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != self._stamp or self._keyring is None:
            try:
                self._keyring = load_keyring(self.settings)
            except KeyFileUnfinished as exc:
                if self._keyring is None:  # nothing to serve meanwhile: at start, no keys, no start
                    raise
                if stamp != self._unfinished:
                    self._unfinished = stamp
                    log.warning(
                        "the key file does not parse (being written?); the last one read serves meanwhile",
                        extra={"event": "key_file_unfinished", "error": str(exc)},
                    )
                return self._keyring
            self._stamp = stamp
        return self._keyring


def write_key_file(path: Path, keyring: Keyring, *, overwrite: bool = False) -> None:
    """Write ``keyring`` atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise KeyringError(f"{path} already exists; refusing to overwrite encryption keys")
    write_private_json(path, keyring.to_json())


def write_private_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder is: a crash must not bring back the old file
    # after the database has committed what the new one holds (a key rotation's re-wrapped keys)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (files created, renamed or deleted in it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SealedBlob:
    ciphertext: bytes = field(repr=False)
    nonce: bytes
    wrapped_key: bytes = field(repr=False)
    kek_id: str

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> SealedBlob | None:
        """The blob in a result row's columns ``<prefix>ciphertext``, ``<prefix>nonce``, ...; None
        where the row has none (an outer join that found no blob)."""
        parts = [getattr(row, f"{prefix}{name}") for name in ("ciphertext", "nonce", "wrapped_key", "kek_id")]
        return None if parts[0] is None else cls(*parts)


def _payload_aad(case_id: uuid.UUID, kind: str) -> bytes:
    return b"|".join([FORMAT, b"payload", str(case_id).encode(), kind.encode()])


def _wrap_aad(case_id: uuid.UUID, kind: str, kek_id: str) -> bytes:
    return b"|".join([FORMAT, b"data-key", str(case_id).encode(), kind.encode(), kek_id.encode()])


def _wrap(keyring: Keyring, kek_id: str, data_key: bytes, case_id: uuid.UUID, kind: str) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(keyring.kek(kek_id)).encrypt(nonce, data_key, _wrap_aad(case_id, kind, kek_id))


def _unwrap(keyring: Keyring, kek_id: str, wrapped: bytes, case_id: uuid.UUID, kind: str) -> bytes:
    kek = AESGCM(keyring.kek(kek_id))  # a key that is missing or malformed is the key file's fault: raised as is
    if len(wrapped) < NONCE_BYTES + TAG_BYTES:  # AES-GCM would raise ValueError for a short nonce
        raise DecryptionError("data key does not unwrap for this case and kind (cut short)")
    try:
        return kek.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(case_id, kind, kek_id))
    except InvalidTag:
        raise DecryptionError("data key does not unwrap for this case and kind (tampered or moved)") from None


def encrypt_blob(
    keyring: Keyring, plaintext: bytes, *, case_id: uuid.UUID, kind: str, kek_id: str | None = None
) -> SealedBlob:
    """Seal ``plaintext`` under a fresh data key wrapped by ``kek_id`` (default: the active KEK; a case's
    blobs pass their period's, :func:`core.period_shredding.wrapping_key`)."""
    wrapping = kek_id or keyring.active_id
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _payload_aad(case_id, kind))
    wrapped = _wrap(keyring, wrapping, data_key, case_id, kind)
    return SealedBlob(ciphertext, nonce, wrapped, wrapping)


def decrypt_blob(
    keyring: Keyring, blob: SealedBlob, *, case_id: uuid.UUID, kind: str, aad_kind: str | None = None
) -> bytes:
    """``blob``'s plaintext; its payload bound to ``aad_kind`` where that differs from the data key's
    ``kind`` (:func:`seal_beside`)."""
    data_key = _unwrap(keyring, blob.kek_id, blob.wrapped_key, case_id, kind)
    if len(blob.nonce) != NONCE_BYTES:  # every blob's is; AES-GCM would raise ValueError for one under 8 bytes
        raise DecryptionError("blob does not decrypt for this case and kind (its nonce is cut short)")
    try:
        return AESGCM(data_key).decrypt(blob.nonce, blob.ciphertext, _payload_aad(case_id, aad_kind or kind))
    except InvalidTag:
        raise DecryptionError("blob does not decrypt for this case and kind (tampered or moved)") from None


def rewrap(keyring: Keyring, blob: SealedBlob, *, case_id: uuid.UUID, kind: str) -> SealedBlob:
    """The same payload with its data key wrapped under the keyring's active KEK."""
    wrapped = rewrap_key(keyring, blob.wrapped_key, blob.kek_id, case_id=case_id, kind=kind)
    return SealedBlob(blob.ciphertext, blob.nonce, wrapped, keyring.active_id)


def rewrap_key(
    keyring: Keyring, wrapped_key: bytes, kek_id: str, *, case_id: uuid.UUID, kind: str, to: str | None = None
) -> bytes:
    """A data key wrapped under ``kek_id``, wrapped again under ``to`` (default: the keyring's active
    KEK). The payload is not needed (nor read): key rotation touches only the small wrapped keys."""
    data_key = _unwrap(keyring, kek_id, wrapped_key, case_id, kind)
    return _wrap(keyring, to or keyring.active_id, data_key, case_id, kind)


def seal_beside(
    keyring: Keyring, blob: SealedBlob, plaintext: bytes, *, case_id: uuid.UUID, kind: str, part: str
) -> tuple[bytes, bytes]:
    """Seal another ``plaintext`` under ``blob``'s data key, bound to ``part``: (ciphertext, nonce). The
    one wrapped key serves both, so a key rotation that re-wraps ``blob`` keeps this readable too (a
    clinic's callback secret and the one it replaced, signing beside it for a while)."""
    data_key = _unwrap(keyring, blob.kek_id, blob.wrapped_key, case_id, kind)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return AESGCM(data_key).encrypt(nonce, plaintext, _payload_aad(case_id, f"{kind}/{part}")), nonce


def open_beside(
    keyring: Keyring, blob: SealedBlob, ciphertext: bytes, nonce: bytes, *, case_id: uuid.UUID, kind: str, part: str
) -> bytes:
    """What :func:`seal_beside` sealed beside ``blob``; :class:`DecryptionError` if it does not open."""
    return decrypt_blob(
        keyring,
        SealedBlob(ciphertext, nonce, blob.wrapped_key, blob.kek_id),
        case_id=case_id,
        kind=kind,
        aad_kind=f"{kind}/{part}",
    )
