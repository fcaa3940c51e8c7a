"""Patient identifiers at rest: a case's client reference (often a medical record number) is
envelope-encrypted like its image, never stored in plain text.

It is a ``client_ref`` blob of the case (:class:`core.models.CaseBlob`): its own data key, wrapped
under the key of the case's period (:mod:`core.period_keys`), with the case id and the kind as
additional authenticated data, so a sealed reference cannot be moved to another case. Key rotation
re-wraps it with the images; erasure and retention shred it with them (the blob rows go), and
destroying its period's key shreds every copy left in backups. A ``pg_dump`` holds only ciphertext.

Cases stored before this (migration 0007) kept the reference in ``cases.client_ref``: the sweeper
seals those in batches (:func:`seal_plain_client_refs`) and empties the column.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from core import audit
from core.crypto import Keyring, SealedBlob, decrypt_blob, encrypt_blob
from core.errors import PERIOD_KEY_DESTROYED, Gone, PeriodKeyDestroyed
from core.models import BlobKind, Case, CaseBlob, CaseStatus

KIND = BlobKind.CLIENT_REF.value
MEDIA_TYPE = "text/plain; charset=utf-8"


def seal_client_ref(keyring: Keyring, case_id: uuid.UUID, client_ref: str, kek_id: str) -> SealedBlob:
    """``client_ref`` sealed, its data key wrapped under ``kek_id`` (the case's period key)."""
    return encrypt_blob(keyring, client_ref.encode(), case_id=case_id, kind=KIND, kek_id=kek_id)


def client_refs(
    session: Session, keyring: Keyring, cases: Sequence[Case], *, skip_destroyed: bool = False
) -> dict[uuid.UUID, str | None]:
    """The client reference of each case (None where it has none, or it was erased), in one query.
    One sealed under a destroyed period key raises :class:`PeriodKeyDestroyed`; with
    ``skip_destroyed`` it is None, like an erased one (see :func:`core.results.read_results`)."""
    found: dict[uuid.UUID, str | None] = {case.id: _plain(case) for case in cases}
    erased = {case.id for case in cases if case.status == CaseStatus.PURGED.value}
    if not cases:
        return found
    rows = session.execute(_SEALED_REFS, {"ids": [case.id for case in cases]})  # columns, not ORM objects
    for row in rows:
        if row.case_id in erased:  # a leftover an erasure will shred: never shown
            continue
        try:
            found[row.case_id] = _open(keyring, row.case_id, SealedBlob.from_row(row))
        except PeriodKeyDestroyed:
            if not skip_destroyed:
                raise
            found[row.case_id] = None
    return found


def open_client_ref(keyring: Keyring, case: Case, sealed: SealedBlob | None) -> str | None:
    """The client reference of ``case`` whose ``client_ref`` blob is ``sealed`` (None: it has none)."""
    if case.status == CaseStatus.PURGED.value:  # erased: whatever an older release or a race left is not shown
        return None
    return case.plain_client_ref if sealed is None else _open(keyring, case.id, sealed)


def _plain(case: Case) -> str | None:
    return None if case.status == CaseStatus.PURGED.value else case.plain_client_ref


def _open(keyring: Keyring, case_id: uuid.UUID, sealed: SealedBlob | None) -> str | None:
    return None if sealed is None else decrypt_blob(keyring, sealed, case_id=case_id, kind=KIND).decode()


_SEALED_REFS = select(
    CaseBlob.case_id, CaseBlob.ciphertext, CaseBlob.nonce, CaseBlob.wrapped_key, CaseBlob.kek_id
).where(CaseBlob.case_id.in_(bindparam("ids", expanding=True)), CaseBlob.kind == KIND)


def seal_plain_client_refs(session: Session, keyring: Keyring, *, limit: int = 500) -> int:
    """Seal up to ``limit`` references still stored in plain text (cases older than migration 0007)
    and empty their column; returns how many. Cheap once none are left (a partial index answers)."""
    from core.cases import insert_blobs
    from core.period_shredding import wrapping_keys

    legacy: list[tuple[uuid.UUID, str, datetime]] = [
        (case_id, ref, created_at)
        for case_id, ref, created_at in session.execute(
            select(Case.id, Case.plain_client_ref, Case.created_at)
            # an erased case's is shredded, never sealed (a blob would keep its period key alive)
            .where(Case.plain_client_ref.is_not(None), Case.status != CaseStatus.PURGED.value)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if ref is not None
    ]
    if not legacy:
        return 0
    wraps = wrapping_keys(session, keyring, [created_at for _, _, created_at in legacy])
    insert_blobs(
        session,
        [
            (case_id, BlobKind.CLIENT_REF, seal_client_ref(keyring, case_id, ref, wraps[created_at]), MEDIA_TYPE)
            for case_id, ref, created_at in legacy
        ],
    )
    session.execute(
        update(Case).where(Case.id.in_([case_id for case_id, _, _ in legacy])).values(plain_client_ref=None)
    )
    return len(legacy)


@contextmanager
def refused_if_destroyed(action: str, case_id: uuid.UUID, **detail: object) -> Iterator[None]:
    """Inside: reading a case's sealed data. A blob sealed under a destroyed period key (a case that a
    restored backup brought back) becomes a 410 ``period_key_destroyed`` audited as a failed ``action``
    on the case: someone reached data restored from a backup, and the trail says who."""
    try:
        yield
    except PeriodKeyDestroyed:
        refused = audit.PendingEvent(
            action, audit.FAILURE, "case", str(case_id), {**detail, "reason": "period_key_destroyed"}
        )
        raise Gone(PERIOD_KEY_DESTROYED, code="period_key_destroyed", audit=refused) from None
