"""Key-encryption-key rotation: add a key, make it active, re-wrap every data key under it.

    dermq keys rotate        # new active KEK in the key file, then re-wrap everything (in batches)
    dermq keys rewrap        # resume after a crash: re-wrap whatever is not yet under the active KEK
    dermq keys status        # how many blobs each KEK still protects
    dermq keys retire ID     # drop an old KEK from the file, refused while any blob still needs it

Only the wrapped data keys change: payloads are never decrypted or rewritten. Each batch commits on
its own, so a crash loses at most one uncommitted batch and ``rewrap`` picks up where it stopped.
Blobs stay readable throughout (old and new KEKs are both in the file), and running API and worker
processes re-read the key file when it changes, so new blobs go under the new key at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, load_only

from core import audit
from core.callbacks import SECRET_KIND
from core.config import Settings
from core.crypto import Keyring, load_keyring, rewrap_key, write_key_file
from core.db import session_scope
from core.errors import KeyringError
from core.models import CaseBlob, ClinicCallback

log = logging.getLogger("dermq.keys")
BATCH = 500


@dataclass(frozen=True, slots=True)
class RewrapReport:
    active: str
    rewrapped: int
    remaining: int


def _key_file(settings: Settings) -> None:
    if settings.keys_json is not None or settings.key_file is None:
        raise KeyringError(
            "keys come from DERMQ_KEYS_JSON: add the new key to your secret store and make it active, "
            "restart, then run `dermq keys rewrap`"
        )


def usage(session: Session) -> dict[str, int]:
    counts: dict[str, int] = {}
    for column in (CaseBlob.kek_id, ClinicCallback.kek_id):  # case blobs, and clinics' sealed callback secrets
        for kek_id, count in session.execute(select(column, func.count()).group_by(column)).all():
            counts[kek_id] = counts.get(kek_id, 0) + count
    return counts


#: Told, after each committed batch, how many data keys have been re-wrapped so far and how many there were.
Progress = Callable[[int, int], None]


def rewrap_all(
    settings: Settings,
    *,
    batch: int = BATCH,
    actor: audit.Actor = audit.SYSTEM,
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> RewrapReport:
    """Re-wrap every data key not under the active KEK, one committed batch at a time."""
    keyring = load_keyring(settings)
    total, batches = 0, 0
    if progress is not None:
        with session_scope(settings) as session:
            to_do = sum(n for kek, n in usage(session).items() if kek != keyring.active_id)
    while max_batches is None or batches < max_batches:
        with session_scope(settings) as session:
            blobs = session.scalars(
                select(CaseBlob)
                .options(load_only(CaseBlob.case_id, CaseBlob.kind, CaseBlob.wrapped_key, CaseBlob.kek_id))
                .where(CaseBlob.kek_id != keyring.active_id)
                .order_by(CaseBlob.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            callback_secrets = (
                []
                if blobs
                else session.scalars(
                    select(ClinicCallback)
                    .where(ClinicCallback.kek_id != keyring.active_id)
                    .order_by(ClinicCallback.clinic_id)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                ).all()
            )
            if not blobs and not callback_secrets:
                break
            for blob in blobs:  # the ciphertext (up to megabytes each) is neither read nor rewritten
                blob.wrapped_key = rewrap_key(
                    keyring, blob.wrapped_key, blob.kek_id, case_id=blob.case_id, kind=blob.kind
                )
                blob.kek_id = keyring.active_id
            for row in callback_secrets:
                row.secret_wrapped_key = rewrap_key(
                    keyring, row.secret_wrapped_key, row.kek_id, case_id=row.clinic_id, kind=SECRET_KIND
                )
                row.kek_id = keyring.active_id
            session.flush()
            audit.record(
                session,
                action="keys.rewrap",
                outcome=audit.SUCCESS,
                actor=actor,
                entity_type="kek",
                entity_id=keyring.active_id,
                detail={"count": len(blobs) + len(callback_secrets)},
            )
            total += len(blobs) + len(callback_secrets)
        batches += 1
        log.info("re-wrapped a batch of data keys", extra={"event": "rewrap", "count": total})
        if progress is not None:
            progress(total, max(to_do, total))
    with session_scope(settings) as session:
        remaining = sum(n for kek, n in usage(session).items() if kek != keyring.active_id)
    return RewrapReport(keyring.active_id, total, remaining)


def rotate(
    settings: Settings,
    *,
    batch: int = BATCH,
    actor: audit.Actor = audit.SYSTEM,
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> RewrapReport:
    """Add a new active KEK to the key file (old keys stay), then re-wrap every data key under it."""
    _key_file(settings)
    assert settings.key_file is not None
    old = load_keyring(settings)
    new = old.with_new_active_key()
    write_key_file(settings.key_file, new, overwrite=True)
    with session_scope(settings) as session:
        audit.record(
            session,
            action="keys.rotate",
            outcome=audit.SUCCESS,
            actor=actor,
            entity_type="kek",
            entity_id=new.active_id,
            detail={"previous": old.active_id},
        )
    return rewrap_all(settings, batch=batch, actor=actor, max_batches=max_batches, progress=progress)


def retire(settings: Settings, kek_id: str, *, actor: audit.Actor = audit.SYSTEM) -> Keyring:
    """Remove ``kek_id`` from the key file once no blob needs it."""
    _key_file(settings)
    assert settings.key_file is not None
    keyring = load_keyring(settings)
    if kek_id == keyring.active_id:
        raise KeyringError(f"{kek_id} is the active key; rotate first")
    if kek_id not in keyring.keks:
        raise KeyringError(f"{kek_id} is not in the key file")
    with session_scope(settings) as session:
        still = usage(session).get(kek_id, 0)
        if still:
            raise KeyringError(f"{still} blobs are still wrapped under {kek_id}; run `dermq keys rewrap` first")
        remaining = {k: v for k, v in keyring.keks.items() if k != kek_id}
        trimmed = Keyring(keyring.active_id, remaining, keyring.api_key_pepper)
        write_key_file(settings.key_file, trimmed, overwrite=True)
        audit.record(
            session,
            action="keys.retire",
            outcome=audit.SUCCESS,
            actor=actor,
            entity_type="kek",
            entity_id=kek_id,
            detail={"active": trimmed.active_id},
        )
    return trimmed
