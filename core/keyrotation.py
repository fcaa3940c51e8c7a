"""Key-encryption-key rotation: add a key, make it active, re-wrap what it protects under it.

    dermq keys rotate        # new active KEK in the key file, then re-wrap everything (in batches)
    dermq keys rewrap        # resume after a crash, and move blobs stored before period keys to theirs
    dermq keys status        # how many blobs and period keys each KEK still protects
    dermq keys retire ID     # drop an old KEK from the file, refused while anything still needs it

How rotation and period keys combine (:mod:`core.period_keys`): a case's data keys are wrapped under
its period's key, and each period key is wrapped under the key file's active KEK. Rotating the key
file's KEK re-wraps the period keys (a few small files) and the clinics' callback secrets, not the
case blobs: those stay under their period key until retention destroys it. Blobs stored before
period keys (wrapped directly under a key-file KEK) are moved under their case's period key by
``rewrap``, which is the migration path; without a period-key folder, blobs are wrapped under the
active KEK as before.

Only the wrapped data keys change: payloads are never decrypted or rewritten. Each batch commits on
its own, so a crash loses at most one uncommitted batch and ``rewrap`` picks up where it stopped. A
row that cannot be re-wrapped (a wrapped key that does not open, a case of a period whose key was
destroyed) is left under its old key and named in the report; the run goes on past it, to the
callback secrets too, and ``retire`` keeps refusing the old key while such a row needs it.
Blobs stay readable throughout (old and new KEKs are both in the file), and running API and worker
processes re-read the key file when it changes, so new period keys go under the new KEK at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, not_, select
from sqlalchemy.orm import Session, load_only

from core import audit, period_shredding
from core.callback_secrets import SECRET_KIND
from core.config import Settings
from core.crypto import Keyring, load_keyring, rewrap_key, write_key_file
from core.db import session_scope
from core.errors import DecryptionError, Gone, KeyringError
from core.models import Case, CaseBlob, ClinicCallback
from core.period_keys import PeriodFile, PeriodKeys
from core.periods import PREFIX

log = logging.getLogger("dermq.keys")
BATCH = 500


@dataclass(frozen=True, slots=True)
class RewrapReport:
    active: str
    rewrapped: int
    remaining: int
    #: rows left under their old key because they cannot be re-wrapped (counted in ``remaining`` too)
    skipped: tuple[Skipped, ...] = ()


def _key_file(settings: Settings) -> None:
    if settings.keys_json is not None or settings.key_file is None:
        raise KeyringError(
            "keys come from DERMQ_KEYS_JSON: add the new key to your secret store and make it active, "
            "restart, then run `dermq keys rewrap`"
        )


def usage(session: Session) -> dict[str, int]:
    """Rows (case blobs, clinics' sealed callback secrets) per KEK id, period keys' ids included."""
    counts: dict[str, int] = {}
    for column in (CaseBlob.kek_id, ClinicCallback.kek_id):
        for kek_id, count in session.execute(select(column, func.count()).group_by(column)).all():
            counts[kek_id] = counts.get(kek_id, 0) + count
    return counts


def period_usage(keyring: Keyring) -> dict[str, int]:
    """Period keys per key-file KEK that wraps them."""
    counts: dict[str, int] = {}
    for entry in keyring.periods.list() if keyring.periods is not None else []:
        if entry.wrapped_by is not None:
            counts[entry.wrapped_by] = counts.get(entry.wrapped_by, 0) + 1
    return counts


def unreadable_period_keys(keyring: Keyring) -> list[PeriodFile]:
    """Period key files that cannot be read (their mode, their content): which KEK wraps them is unknown,
    so they are neither re-wrapped nor counted under a KEK, and no KEK is retired while one is left."""
    entries = keyring.periods.list() if keyring.periods is not None else []
    return [entry for entry in entries if entry.problem is not None and entry.destroyed_at is None]


def _misplaced(keyring: Keyring) -> ColumnElement[bool]:
    """Case blobs not wrapped where they belong: under a period key (or, without them, the active KEK)."""
    if keyring.periods is None:
        return CaseBlob.kek_id != keyring.active_id
    return not_(CaseBlob.kek_id.startswith(PREFIX, autoescape=True))


def _remaining(session: Session, keyring: Keyring) -> int:
    blobs = session.scalar(select(func.count()).select_from(CaseBlob).where(_misplaced(keyring))) or 0
    secrets = (
        session.scalar(
            select(func.count()).select_from(ClinicCallback).where(ClinicCallback.kek_id != keyring.active_id)
        )
        or 0
    )
    periods = sum(n for kek, n in period_usage(keyring).items() if kek != keyring.active_id)
    return blobs + secrets + periods + len(unreadable_period_keys(keyring))


#: Told, after each committed batch, how many data keys have been re-wrapped so far and how many there were.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Skipped:
    """A row :func:`rewrap_all` could not re-wrap and left where it is (it stays counted in ``remaining``):
    a wrapped key that does not open (tampered or corrupt), or a case of a period whose key was destroyed.
    Ids and kinds only: no patient data."""

    #: ``case <id> <kind>`` or ``clinic <id> callback secret``
    row: str
    reason: str


@dataclass(slots=True)
class _Batch:
    rewrapped: int
    skipped: list[Skipped]
    #: the key of the batch's last row: the next batch starts after it, so a row left behind is never met again
    last: uuid.UUID


def _targets(session: Session, keyring: Keyring, created: list[datetime]) -> dict[datetime, str | Gone]:
    """The KEK each creation time's blobs go under (:func:`period_shredding.wrapping_keys`), period by period in
    one order, or the refusal for a period whose key was destroyed (no case of it should still have blobs:
    one restored from a backup older than the destruction can)."""
    if keyring.periods is None:
        return dict(period_shredding.wrapping_keys(session, keyring, created))
    by_period: dict[str, list[datetime]] = {}
    for when in created:
        by_period.setdefault(keyring.periods.current(when), []).append(when)
    targets: dict[datetime, str | Gone] = {}
    for period in sorted(by_period):
        try:
            targets.update(period_shredding.wrapping_keys(session, keyring, by_period[period]))
        except Gone as exc:
            targets.update(dict.fromkeys(by_period[period], exc))
    return targets


def _blob_batch(session: Session, keyring: Keyring, *, after: uuid.UUID | None, limit: int) -> _Batch | None:
    """Re-wrap up to ``limit`` misplaced case blobs after ``after`` (by id); None when there are none."""
    query = (
        select(CaseBlob, Case.created_at)
        .join(Case, Case.id == CaseBlob.case_id)
        .options(load_only(CaseBlob.case_id, CaseBlob.kind, CaseBlob.wrapped_key, CaseBlob.kek_id))
        # a blob under a KEK the key file lacks cannot be re-wrapped: left (and counted as remaining)
        .where(_misplaced(keyring), CaseBlob.kek_id.in_(list(keyring.keks)))
        .order_by(CaseBlob.id)
        .limit(limit)
        .with_for_update(of=CaseBlob, skip_locked=True)
    )
    found = session.execute(query if after is None else query.where(CaseBlob.id > after)).all()
    if not found:
        return None
    targets = _targets(session, keyring, [created for _, created in found])
    done, skipped = 0, []
    for blob, created in found:  # the ciphertext (up to megabytes each) is neither read nor rewritten
        target = targets[created]
        try:
            if isinstance(target, Gone):
                raise target
            wrapped = rewrap_key(
                keyring, blob.wrapped_key, blob.kek_id, case_id=blob.case_id, kind=blob.kind, to=target
            )
        except (DecryptionError, Gone) as exc:  # this row's fault: the others of the batch go on
            skipped.append(Skipped(f"case {blob.case_id} {blob.kind}", str(exc)))
            continue
        blob.wrapped_key, blob.kek_id = wrapped, target
        done += 1
    return _Batch(done, skipped, found[-1][0].id)


def _secret_batch(session: Session, keyring: Keyring, *, after: uuid.UUID | None, limit: int) -> _Batch | None:
    """Re-wrap up to ``limit`` clinics' callback secrets not under the active KEK, after clinic ``after``."""
    query = (
        select(ClinicCallback)
        .where(ClinicCallback.kek_id != keyring.active_id, ClinicCallback.kek_id.in_(list(keyring.keks)))
        .order_by(ClinicCallback.clinic_id)
        .limit(limit)
        # (FOR NO KEY UPDATE: a callback's last look before its notice holds the row FOR KEY SHARE, and
        # FOR UPDATE would skip it, leaving its secret under the old key for this run)
        .with_for_update(skip_locked=True, key_share=True)
    )
    rows = session.scalars(query if after is None else query.where(ClinicCallback.clinic_id > after)).all()
    if not rows:
        return None
    done, skipped = 0, []
    for row in rows:
        try:
            wrapped = rewrap_key(keyring, row.secret_wrapped_key, row.kek_id, case_id=row.clinic_id, kind=SECRET_KIND)
        except DecryptionError as exc:
            skipped.append(Skipped(f"clinic {row.clinic_id} callback secret", str(exc)))
            continue
        row.secret_wrapped_key, row.kek_id = wrapped, keyring.active_id
        done += 1
    return _Batch(done, skipped, rows[-1].clinic_id)


def rewrap_all(
    settings: Settings,
    *,
    batch: int = BATCH,
    actor: audit.Actor = audit.SYSTEM,
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> RewrapReport:
    """Re-wrap the period keys and the callback secrets under the active KEK, and every case blob not
    under its case's period key under it, one committed batch at a time. A row that cannot be re-wrapped
    is left as it is and named in the report's ``skipped``; the others, and the callback secrets, go on."""
    keyring = load_keyring(settings)
    total, batches = 0, 0
    if keyring.periods is not None:
        total += keyring.periods.rewrap(keyring)  # a few small files, under the folder's lock
    skipped = [Skipped(f"period key {e.period}", str(e.problem)) for e in unreadable_period_keys(keyring)]
    if progress is not None:
        with session_scope(settings) as session:
            to_do = _remaining(session, keyring) + total
    for step in (_blob_batch, _secret_batch):
        after: uuid.UUID | None = None
        while max_batches is None or batches < max_batches:
            with session_scope(settings) as session:
                done = step(session, keyring, after=after, limit=batch)
                if done is None:
                    break
                session.flush()
                audit.record(
                    session,
                    action="keys.rewrap",
                    outcome=audit.SUCCESS,
                    actor=actor,
                    entity_type="kek",
                    entity_id=keyring.active_id,
                    detail={"count": done.rewrapped, **({"skipped": len(done.skipped)} if done.skipped else {})},
                )
            after, total, batches = done.last, total + done.rewrapped, batches + 1
            for row in done.skipped:
                log.warning(
                    "a data key could not be re-wrapped; left under its old key",
                    extra={"event": "rewrap_skipped", "row": row.row, "reason": row.reason},
                )
            skipped += done.skipped
            log.info("re-wrapped a batch of data keys", extra={"event": "rewrap", "count": total})
            if progress is not None:
                progress(total, max(to_do, total))
    with session_scope(settings) as session:
        remaining = _remaining(session, keyring)
    return RewrapReport(keyring.active_id, total, remaining, tuple(skipped))


@contextlib.contextmanager
def changing_key_file(settings: Settings, *, periods: bool = True) -> Iterator[None]:
    """Exclusive across processes: :func:`rotate` and :func:`retire` read, change and write the key file
    under it, so neither writes back a key file the other changed meanwhile (a retirement writing its
    stale copy would drop the key a rotation had just added and re-wrapped everything under). With
    ``periods``, the period-key folder's lock too: no period key is created under a KEK being retired."""
    assert settings.key_file is not None
    fd = os.open(settings.key_file.with_name(f".{settings.key_file.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        folder = settings.period_key_folder
        held = PeriodKeys(folder, settings).locked() if periods and folder is not None else contextlib.nullcontext()
        with held:
            yield
    finally:
        os.close(fd)  # releases the lock


def rotate(
    settings: Settings,
    *,
    batch: int = BATCH,
    actor: audit.Actor = audit.SYSTEM,
    max_batches: int | None = None,
    progress: Progress | None = None,
    rewrap: bool = True,
) -> RewrapReport:
    """Add a new active KEK to the key file (old keys stay), then re-wrap every data key under it.

    Without ``rewrap`` only the key file changes (``remaining`` is then -1: not counted): for a key
    file that the running processes mount as a secret, rotated on a copy, re-wrapping must wait until
    every process reads the new file (:func:`rewrap_all`, ``dermq keys rewrap``), or the period keys
    and callback secrets it re-wraps are under a KEK those processes do not have."""
    _key_file(settings)
    assert settings.key_file is not None
    folder = settings.period_key_folder
    if rewrap and folder is not None:  # before the key file changes: the re-wrap needs the period keys
        PeriodKeys(folder, settings).require_folder()
    # the folder's lock is not held: the re-wrap below takes it, and a period key created meanwhile
    # under the old KEK is re-wrapped with the rest
    with changing_key_file(settings, periods=False), session_scope(settings) as session:
        old = load_keyring(settings)
        new = old.with_new_active_key()
        audit.record(
            session,
            action="keys.rotate",
            outcome=audit.SUCCESS,
            actor=actor,
            entity_type="kek",
            entity_id=new.active_id,
            detail={"previous": old.active_id},
        )
        session.flush()
        write_key_file(settings.key_file, new, overwrite=True)  # then the event commits
    if not rewrap:
        return RewrapReport(new.active_id, 0, -1)
    return rewrap_all(settings, batch=batch, actor=actor, max_batches=max_batches, progress=progress)


def retire(settings: Settings, kek_id: str, *, actor: audit.Actor = audit.SYSTEM) -> Keyring:
    """Remove ``kek_id`` from the key file once no blob, callback secret or period key needs it. Under the
    period-key folder's lock: a process creating a period key meanwhile waits, then reads the new file."""
    _key_file(settings)
    assert settings.key_file is not None
    with changing_key_file(settings), session_scope(settings) as session:
        keyring = load_keyring(settings)  # under the lock: what a rotation meanwhile wrote
        if kek_id == keyring.active_id:
            raise KeyringError(f"{kek_id} is the active key; rotate first")
        if kek_id not in keyring.keks:
            raise KeyringError(f"{kek_id} is not in the key file")
        if unreadable := unreadable_period_keys(keyring):  # one of them may be wrapped under kek_id
            raise KeyringError(
                f"{len(unreadable)} period key files cannot be read ({unreadable[0].problem}); which key wraps "
                "them is unknown: mend them and run `dermq keys rewrap` first"
            )
        still = usage(session).get(kek_id, 0) + period_usage(keyring).get(kek_id, 0)
        if still:
            raise KeyringError(
                f"{still} blobs or period keys are still wrapped under {kek_id}; run `dermq keys rewrap` first"
            )
        remaining = {k: v for k, v in keyring.keks.items() if k != kek_id}
        trimmed = Keyring(keyring.active_id, remaining, keyring.api_key_pepper)
        audit.record(
            session,
            action="keys.retire",
            outcome=audit.SUCCESS,
            actor=actor,
            entity_type="kek",
            entity_id=kek_id,
            detail={"active": trimmed.active_id},
        )
        session.flush()  # the event is in; the file changes just before it commits
        write_key_file(settings.key_file, trimmed, overwrite=True)
    return trimmed
