"""Signed checkpoints of the audit log, in the C2SP formats (the witness file: :mod:`core.witness`).

A checkpoint (c2sp.org/tlog-checkpoint) is a signed note (c2sp.org/signed-note)::

    dermq.example/audit          <- origin: names the log
    1234                         <- tree size
    <base64 root hash>           <- RFC 9162 root of the first 1234 events
    time 2026-12-01T14:00:00.250Z <- extension line: when the sealer signed it (to the millisecond)
                                 <- blank line: the signed text ends above it
    — dermq.example/audit <base64(4-byte key id || Ed25519 signature)>

The key id is SHA-256(name || 0x0A || 0x01 || public key)[:4] and the verifier key is written
``name+hex(key id)+base64(0x01 || public key)``, as Go's ``golang.org/x/mod/sumdb/note`` does, so
generic transparency-log tools and witnesses read both. The signing key lives in a file outside the
database (``DERMQ_AUDIT_SIGNING_KEY_FILE``, beside the encryption key file): a database login cannot
sign. Retired verifier keys stay in that file so that older checkpoints still verify after rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.config import Settings
from core.crypto import read_private_file, write_private_json
from core.errors import KeyringError

ALG_ED25519 = b"\x01"
DASH = "\u2014"


class CheckpointError(ValueError):
    """A checkpoint that does not parse or whose signature does not verify."""


class MalformedCheckpoint(CheckpointError):
    """Text that is not a checkpoint at all, as against one whose signature does not verify."""


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + public).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    name: str
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public)

    def encode(self) -> str:
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(ALG_ED25519 + self.public).decode()}"

    @classmethod
    def decode(cls, text: str) -> Verifier:
        try:
            name, hex_id, b64 = text.strip().split("+", 2)  # key names hold no "+"; base64 may
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            raise CheckpointError("a verifier key reads name+hexid+base64(0x01||key)") from None
        if raw[:1] != ALG_ED25519 or len(raw) != 33 or key_id(name, raw[1:]).hex() != hex_id:
            raise CheckpointError(f"verifier key {name!r} is not an Ed25519 key matching its id")
        return cls(name, raw[1:])

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    name: str
    private: Ed25519PrivateKey

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def encode(self) -> str:
        """Go's private key form ``PRIVATE+KEY+name+hexid+base64(0x01 || seed)`` (golang.org/x/mod/sumdb/note)."""
        seed = ALG_ED25519 + self.private.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.id.hex()}+{base64.b64encode(seed).decode()}"

    @classmethod
    def decode(cls, text: str) -> Signer:
        try:
            prefix, key, name, hex_id, b64 = text.strip().split("+", 4)
            raw = base64.b64decode(b64, validate=True)
            if (prefix, key) != ("PRIVATE", "KEY") or raw[:1] != ALG_ED25519 or len(raw) != 33:
                raise ValueError
            signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        except (ValueError, binascii.Error):
            raise CheckpointError("a signer key reads PRIVATE+KEY+name+hexid+base64(0x01||seed)") from None
        if signer.verifier.id.hex() != hex_id:
            raise CheckpointError("the signer key's id does not match its name and key")
        return signer

    def sign_line(self, text: str) -> str:
        signature = self.private.sign(text.encode())
        return f"{DASH} {self.name} {base64.b64encode(self.verifier.id + signature).decode()}\n"


@dataclass(frozen=True)
class SigningKeys:
    signer: Signer
    retired: tuple[Verifier, ...] = ()

    @property
    def verifiers(self) -> tuple[Verifier, ...]:
        return (self.signer.verifier, *self.retired)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: datetime

    def body(self) -> str:
        when = self.time.astimezone(UTC)
        millis = when.microsecond // 1000  # what the line holds; the sealer signs times already cut to it
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{millis:03d}Z" if millis else "Z")
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\ntime {stamp}\n"

    def sign(self, signer: Signer) -> str:
        body = self.body()
        return body + "\n" + signer.sign_line(body)


def _parse_time(stamp: str) -> datetime:
    """An RFC 3339 UTC time as the ``time`` line carries it: whole seconds, or milliseconds."""
    for layout in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return datetime.strptime(stamp, layout).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise MalformedCheckpoint(f"the time line {stamp!r} is not an RFC 3339 UTC time")


def parse(note: str, verifiers: tuple[Verifier, ...] | list[Verifier]) -> Checkpoint:
    """Parse a signed checkpoint and require a valid signature by one of ``verifiers``."""
    return verified(note, verifiers)[0]


def unverified(note: str) -> Checkpoint:
    """What a signed note says (origin, size, root, time), its signatures not checked: for a server
    that holds no verifier key and hands the note on to be checked by whoever relies on it."""
    body, sep, _ = note.partition("\n\n")
    if not sep or not body:
        raise MalformedCheckpoint("not a signed note: no blank line between the text and its signatures")
    lines = (body + "\n").splitlines()
    if len(lines) < 3:
        raise MalformedCheckpoint("a checkpoint has an origin, a tree size and a root hash")
    try:
        size = int(lines[1])
        root = base64.b64decode(lines[2], validate=True)
    except (ValueError, binascii.Error):
        raise MalformedCheckpoint("the tree size or the root hash does not parse") from None
    if size < 0 or len(root) != 32 or lines[1] != str(size):
        raise MalformedCheckpoint("the tree size or the root hash is malformed")
    stamp = next((line[5:] for line in lines[3:] if line.startswith("time ")), None)
    when = _parse_time(stamp) if stamp else datetime.fromtimestamp(0, UTC)
    return Checkpoint(lines[0], size, root, when)


def verified(note: str, verifiers: tuple[Verifier, ...] | list[Verifier]) -> tuple[Checkpoint, Verifier]:
    """:func:`parse`, and which of ``verifiers`` signed the note."""
    says = unverified(note)
    body, _, signatures = note.partition("\n\n")
    body += "\n"
    by_id = {(v.name, v.id): v for v in verifiers}
    for line in signatures.splitlines():
        if not line.startswith(DASH + " "):
            continue
        try:
            name, b64 = line[2:].rsplit(" ", 1)
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            continue
        verifier = by_id.get((name, raw[:4]))
        if verifier is not None and verifier.verify(body.encode(), raw[4:]):
            return says, verifier
    raise CheckpointError("no signature on this checkpoint verifies with a known audit signing key")


# --------------------------------------------------------------------------- the key file


def signing_key_path(settings: Settings) -> Path:
    if settings.audit_signing_key_file is not None:
        return settings.audit_signing_key_file
    if settings.key_file is None:
        raise KeyringError("set DERMQ_AUDIT_SIGNING_KEY_FILE (no DERMQ_KEY_FILE to put it beside)")
    return settings.key_file.with_name("audit-signing-key.json")


def generate(name: str) -> SigningKeys:
    return SigningKeys(Signer(name, Ed25519PrivateKey.generate()))


def to_json(keys: SigningKeys) -> dict[str, object]:
    return {
        "version": 1,
        "signer": keys.signer.encode(),
        "verifier": keys.signer.verifier.encode(),
        "retired_verifiers": [v.encode() for v in keys.retired],
    }


def from_json(data: dict[str, object]) -> SigningKeys:
    try:
        signer = Signer.decode(str(data["signer"]))
        retired = tuple(Verifier.decode(str(v)) for v in data.get("retired_verifiers", []) or [])  # type: ignore[attr-defined]
    except (KeyError, ValueError, binascii.Error, CheckpointError) as exc:
        raise KeyringError(f"the audit signing key file does not parse: {exc}") from None
    return SigningKeys(signer, retired)


def write_signing_keys(path: Path, keys: SigningKeys) -> None:
    """Write the key file atomically with mode 0600 (never readable by others, even briefly)."""
    write_private_json(path, to_json(keys))


def load_signing_keys(settings: Settings) -> SigningKeys:
    path = signing_key_path(settings)
    try:
        data = json.loads(read_private_file(path, "audit signing key file"))
    except FileNotFoundError:
        raise KeyringError(
            f"no audit signing key at {path}; create it with `dermq keys init` (it lives outside the database)"
        ) from None
    except json.JSONDecodeError:
        raise KeyringError(f"the audit signing key file {path} is not JSON") from None
    keys = from_json(data)
    if keys.signer.name != settings.audit_log_origin:
        raise KeyringError(
            f"the audit signing key is named {keys.signer.name!r} but DERMQ_AUDIT_LOG_ORIGIN is "
            f"{settings.audit_log_origin!r}; they must match"
        )
    return keys


def rotate_signing_keys(path: Path, name: str) -> SigningKeys:
    """A new signing key; the old one's verifier key stays listed so older checkpoints still verify."""
    old = from_json(json.loads(path.read_text()))
    keys = SigningKeys(Signer(name, Ed25519PrivateKey.generate()), (old.signer.verifier, *old.retired))
    write_signing_keys(path, keys)
    return keys
