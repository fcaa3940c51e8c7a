"""Per-period key-encryption keys, so that crypto-shredding reaches backups.

Erasure deletes a case's blob rows, but a database backup taken before still holds their ciphertext
and wrapped data keys, readable as long as the key that wrapped them lives. So a case's data keys
are wrapped under the key of the *period* the case was created in (a UTC calendar month by default;
``DERMQ_KEY_PERIOD``: ``month``, ``week`` or ``day``; KEK id ``period-2026-12``), and retention
destroys a period's key once every case of it is past retention (:mod:`core.period_shredding`).
From then on no copy of that period's blobs, in the live database or in any backup of any age,
can be decrypted, even with the key file.

Each period key is 32 random bytes (the kernel's generator), never derived from anything that survives it. It
lives in a file of its own, ``<period>.json`` in the period-key folder (``DERMQ_PERIOD_KEY_DIR``):
outside the database, written atomically with mode 0600, and never part of a backup (the
deployment's rule: docs/SECURITY.md, deploy/README.md). The file holds the key wrapped under the key
file's active KEK (AES-GCM, associated data naming the period and that KEK), so the folder alone
opens nothing, and ``dermq keys rotate`` re-wraps the period files under the new KEK
(:meth:`PeriodKeys.rewrap`). Destroying a period writes a tombstone ``<period>.destroyed`` and
deletes the key file; a destroyed period never gets a key again.

Processes that seal (the API, the workers) create the key of a new period on first use: under an
exclusive ``flock`` of the folder, re-reading the key file, so that a KEK retired meanwhile (retiring
takes the same lock) is never used; the file appears with ``link()``, so concurrent creators on
other hosts cannot both win. The folder must therefore be writable by the API, the workers and
whatever runs retention, and shared by all of them (one volume). Only ``dermq keys init`` creates
it (beside a local key file; deployments mount it), never a process that seals: one lacking the
volume would make keys for itself that no other process can read, lost when it goes. So a missing
folder is refused (503), and an empty one (the images create the folder, so a container without
the volume has one) only gets a first key while the database holds nothing sealed under period
keys (:func:`core.period_shredding.wrapping_keys`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.config import Settings
from core.errors import (
    DecryptionError,
    Gone,
    KeyringError,
    PeriodKeyDestroyed,
    PeriodKeysUnavailable,
    ServiceUnavailable,
)
from core.held_period_keys import HeldKeys, new_key, zero
from core.periods import PREFIX, bounds, is_period, kek_id, period_of

if TYPE_CHECKING:
    from core.crypto import Keyring

KEY_BYTES = 32
#: a key write's temporary file this old is a crash's leftover, not a write under way on another host
LEFTOVER_SECONDS = 300
NONCE_BYTES = 12
TAG_BYTES = 16


# --------------------------------------------------------------------------- the folder


@dataclass(frozen=True, slots=True)
class PeriodFile:
    """One period of the folder: a live key (``wrapped_by``, the KEK that wraps it) or a tombstone. A file
    that cannot be read has a ``problem`` (its mode, its content): a key file's has no ``wrapped_by``, a
    tombstone's is still a tombstone (``destroyed_at`` ``unknown``: its key is never served)."""

    period: str
    wrapped_by: str | None
    created_at: str | None
    destroyed_at: str | None
    reason: str | None
    problem: str | None = None


def _wrap_aad(period: str, wrapping: str) -> bytes:
    return b"|".join([b"dermq/v1", b"period-key", period.encode(), wrapping.encode()])


class PeriodKeys:
    """The period-key folder of a process: creates, reads (held while the file is unchanged, and
    forgotten within seconds of its destruction: :mod:`core.held_period_keys`), re-wraps, lists and
    destroys period keys."""

    def __init__(self, folder: Path, settings: Settings) -> None:
        self.folder = folder
        self.settings = settings
        self._held = HeldKeys(folder)

    def owns(self, kek: str) -> bool:
        return kek.startswith(PREFIX)

    def current(self, when: datetime) -> str:
        return period_of(when, self.settings.key_period)

    def _key_file(self, period: str) -> Path:
        bounds(period)  # a period id, never a path of the caller's choosing
        return self.folder / f"{period}.json"

    def _tombstone(self, period: str) -> Path:
        return self.folder / f"{period}.destroyed"

    def destroyed(self, period: str) -> bool:
        return self._tombstone(period).exists()

    def exists(self, period: str) -> bool:
        return self._key_file(period).exists()

    def holds_nothing(self) -> bool:
        """No key and no tombstone: a folder no period key was ever made in, or not the services' shared one."""
        return not any(self.folder.glob("*.json")) and not any(self.folder.glob("*.destroyed"))

    def create_folder(self) -> bool:
        """Create the folder (mode 0700) if it is missing: ``dermq keys init``, beside a local key file. True
        if it was created."""
        if self.folder.is_dir():
            return False
        self.folder.mkdir(mode=0o700, parents=True)
        return True

    def require_folder(self) -> None:
        """:class:`PeriodKeysUnavailable` unless the folder exists. It is never created here: the deployment
        creates it (the images, ``dermq keys init`` beside a local key file), and one created by a process
        that lacks the shared volume would get keys no other process can read, lost when it goes."""
        if not self.folder.is_dir():
            raise PeriodKeysUnavailable(
                f"the period key folder {self.folder} does not exist: is DERMQ_PERIOD_KEY_DIR's volume mounted? "
                "(`dermq keys init` creates it beside a local key file)"
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes and hosts sharing the folder: creating a key, re-wrapping and
        retiring a KEK (:func:`core.keyrotation.retire`) take it. A KeyringError if the folder is missing."""
        self.require_folder()
        with open(self.folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------- reading

    def _read(self, path: Path) -> dict[str, Any]:
        # Written 0600. Group bits are tolerated: Kubernetes gives a volume's files to the pod's fsGroup
        # (group read and write) when it mounts them; the volume is dermq's own. Others: never.
        with path.open("rb") as handle:  # the mode checked is the opened file's (no swap in between)
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o007:
                raise PeriodKeysUnavailable(
                    f"period key file {path} has mode {mode:o}: others may read or change it; chmod 600 it"
                )
            raw = handle.read()
        try:
            record = json.loads(raw)
            base64.b64decode(record["wrapped_key"], validate=True)
            str(record["kek_id"])
        except (OSError, ValueError, KeyError, TypeError):
            raise PeriodKeysUnavailable(f"period key file {path} is not one dermq wrote") from None
        return dict(record)

    def key(self, keyring: Keyring, kek: str) -> bytearray:
        """The unwrapped key of ``kek`` (``period-...``), zeroed once its period is destroyed (use it at
        once, never keep it); a DecryptionError once it was destroyed."""
        period = kek[len(PREFIX) :]
        try:
            path = self._key_file(period)
        except ValueError:  # a malformed id in a blob's row: that blob can never be read, not a missing key
            raise DecryptionError("the blob names a period key id that is not one (malformed row)") from None
        if self.destroyed(period):  # a tombstone wins over a key file a crash left behind
            self._held.forget(period)  # destroyed by another process: no copy stays in this one's memory
            raise PeriodKeyDestroyed(
                f"the key of period {period} was destroyed (retention): its blobs can never be decrypted"
            )
        try:
            info = path.stat()
        except FileNotFoundError:
            if not self.folder.is_dir() or not any(self.folder.glob("*.json")):  # the volume, not this key
                raise PeriodKeysUnavailable(
                    f"the period key folder {self.folder} is missing or holds no key: is DERMQ_PERIOD_KEY_DIR's "
                    "volume mounted?"
                ) from None
            raise DecryptionError(
                f"no key for period {period} in {self.folder}; is DERMQ_PERIOD_KEY_DIR the folder the "
                "other services use?"
            ) from None
        stamp = (info.st_ino, info.st_mtime_ns)
        if (held := self._held.get(period, stamp)) is not None:
            return held
        record = self._read(path)
        if str(record["kek_id"]) not in keyring.keks:  # wrapped by a rotation newer than this keyring
            from core.crypto import load_keyring_settled

            keyring = load_keyring_settled(self.settings)
        return self._held.put(period, stamp, self._unwrap(keyring, period, record))

    @staticmethod
    def _unwrap(keyring: Keyring, period: str, record: dict[str, Any]) -> bytearray:
        """The key of ``record``, unwrapped straight into a buffer that can be zeroed (no ``bytes`` copy)."""
        wrapping = str(record["kek_id"])
        wrapped = base64.b64decode(record["wrapped_key"])
        key = bytearray(max(len(wrapped) - NONCE_BYTES - TAG_BYTES, 0))
        try:
            AESGCM(keyring.kek(wrapping)).decrypt_into(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(period, wrapping), key
            )
        except InvalidTag:
            zero(key)
            raise DecryptionError(f"the key of period {period} does not unwrap (tampered or moved)") from None
        return key

    @staticmethod
    def _record(keyring: Keyring, period: str, key: bytearray, created_at: str) -> dict[str, Any]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        wrapped = nonce + AESGCM(keyring.kek(keyring.active_id)).encrypt(
            nonce, key, _wrap_aad(period, keyring.active_id)
        )
        return {
            "version": 1,
            "period": period,
            "kek_id": keyring.active_id,
            "wrapped_key": base64.b64encode(wrapped).decode(),
            "created_at": created_at,
        }

    # ------------------------------------------------------------------- writing

    def ensure(self, period: str) -> str:
        """The KEK id of ``period``, creating its key if it has none yet (a 410 for a destroyed one). A 503
        if the folder does not exist: it is never created here (:meth:`require_folder`)."""
        if self.exists(period):
            return kek_id(period)
        try:
            self.require_folder()
        except KeyringError as exc:
            raise ServiceUnavailable(str(exc), code="period_keys_unavailable") from None
        try:
            return self._create(period)
        except OSError as exc:  # an unwritable volume: the operator's to fix, not the client's
            raise ServiceUnavailable(
                f"the key of period {period} cannot be stored ({type(exc).__name__}); operators: check that "
                "DERMQ_PERIOD_KEY_DIR is the shared, writable period-key volume",
                code="period_keys_unavailable",
            ) from None

    def _create(self, period: str) -> str:
        with self.locked():
            if self.exists(period):
                return kek_id(period)
            if self.destroyed(period):
                raise Gone(
                    f"the encryption key of period {period} was destroyed; nothing can be stored for it",
                    code="period_key_destroyed",
                )
            from core.crypto import load_keyring_settled

            master = load_keyring_settled(self.settings)  # re-read under the lock: never a KEK retired meanwhile
            key = new_key(KEY_BYTES)
            try:
                record = self._record(master, period, key, datetime.now(UTC).isoformat(timespec="seconds"))
            finally:
                zero(key)  # read back (and held) from its file like any other
            with contextlib.suppress(FileExistsError):  # another host's process was first: its key stands
                self._publish(self._key_file(period), record)
        return kek_id(period)

    def _publish(self, path: Path, record: dict[str, Any]) -> None:
        """Create ``path`` (mode 0600, complete or not at all); never replaces an existing file."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(record, indent=2) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # fails if another host created it meanwhile (a folder whose flock is local)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links (SMB): the folder's lock is all there is
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._sync_folder()

    def _sync_folder(self) -> None:
        from core.crypto import sync_folder

        sync_folder(self.folder)

    def rewrap(self, keyring: Keyring) -> int:
        """Re-wrap every period key not under ``keyring``'s active KEK under it (key rotation); how many.
        The temporary files of key writes a crash interrupted go first: a copy of a key under the KEK it was
        written under (after :meth:`_publish`'s link, the very file), which retiring that KEK must not leave."""
        from core.crypto import write_private_json

        done = 0
        with self.locked():  # every write holds it; on a volume whose flock is only local, a write on
            # another host may not: only a temporary file minutes old is a crash's leftover
            stale = time.time() - LEFTOVER_SECONDS
            leftovers = [
                p
                for p in self.folder.glob(".*.json.*")
                if is_period(p.name[1:].partition(".json.")[0]) and p.stat().st_mtime < stale
            ]
            for leftover in leftovers:
                leftover.unlink(missing_ok=True)
            if leftovers:
                self._sync_folder()
            for entry in self.list():
                if entry.wrapped_by is None or entry.wrapped_by == keyring.active_id:
                    continue
                if entry.wrapped_by not in keyring.keks:  # cannot be opened: left for `keys status` to name
                    continue
                path = self._key_file(entry.period)
                record = self._read(path)
                key = self._unwrap(keyring, entry.period, record)
                try:
                    write_private_json(path, self._record(keyring, entry.period, key, str(record.get("created_at"))))
                finally:
                    zero(key)
                done += 1
        return done

    def destroy(self, period: str, *, reason: str) -> bool:
        """Tombstone ``period`` and delete its key file; False if it had no key (already destroyed).

        Under the folder's lock, so a re-wrap (key rotation) that read the key cannot write it back
        afterwards. The tombstone is written first: once it exists the key is never served again, and a
        key file a crash left beside it is deleted by the next call."""
        from core.crypto import write_private_json

        with self.locked():
            path = self._key_file(period)
            if not self.destroyed(period):
                at = datetime.now(UTC).isoformat(timespec="seconds")
                write_private_json(self._tombstone(period), {"period": period, "destroyed_at": at, "reason": reason})
            existed = path.exists()
            path.unlink(missing_ok=True)
            # a write a crash interrupted leaves its temporary file, the same key under another name
            # (after the hard link of _publish, the very same file): destroyed too
            for leftover in self.folder.glob(f".{path.name}.*"):
                leftover.unlink(missing_ok=True)
            self._sync_folder()
            self._held.forget(period)
        return existed

    def list(self) -> list[PeriodFile]:
        """Every period with a key or a tombstone, oldest first. A file that cannot be read is listed with
        its ``problem``, never raised: one bad file does not hide the others (nor stop retention)."""
        if not self.folder.is_dir():
            return []
        found: dict[str, PeriodFile] = {}
        for path in self.folder.glob("*.destroyed"):
            if is_period(path.stem):
                found[path.stem] = self._tombstone_entry(path)
        for path in self.folder.glob("*.json"):
            # destroyed: a key file a crash left beside the tombstone is not a key
            if path.stem not in found and is_period(path.stem):
                try:
                    record = self._read(path)
                except (KeyringError, OSError) as exc:
                    found[path.stem] = PeriodFile(path.stem, None, None, None, None, _problem(exc))
                    continue
                found[path.stem] = PeriodFile(path.stem, record["kek_id"], record.get("created_at"), None, None)
        return [found[period] for period in sorted(found, key=lambda p: bounds(p)[0])]

    @staticmethod
    def _tombstone_entry(path: Path) -> PeriodFile:
        try:
            data = json.loads(path.read_text())
            return PeriodFile(path.stem, None, None, str(data["destroyed_at"]), data.get("reason"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return PeriodFile(path.stem, None, None, "unknown", None, f"tombstone {path.name}: {_problem(exc)}")


def _problem(exc: Exception) -> str:
    """Why a period file cannot be read, without its content (a KeyringError's message names the file)."""
    if isinstance(exc, KeyringError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'cannot be read'}"
    return "not one dermq wrote"
