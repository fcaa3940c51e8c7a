"""A case's result at rest: the operational part in its ``results`` row, the findings about the patient
sealed in the case's ``result`` blob.

The findings (:data:`core.models.SEALED_RESULT_FIELDS`: label, probabilities, confidence,
uncertainty, referral and its reasons, out-of-distribution reasons, the class Grad-CAM explained)
are one JSON document, envelope-encrypted like the image: its own data key, wrapped under the key
of the case's period (:mod:`core.period_keys`), with the case id and the kind ``result`` as
associated data. Binding to the kind rather than to each field is enough: the document is sealed
and opened whole, so no field can be moved alone, and a sealed document moved to another case or
kind does not decrypt. Key rotation re-wraps it with the other blobs; erasure and retention shred
it (:mod:`core.retention`), after which the row says only which model ran, when and how
(``outcome``, model, device, timings, Grad-CAM status, input statistics), and no diagnosis of the
case can be read back; destroying its period's key does the same for copies in backups.

``outcome`` stays plain: it says whether the image could be judged (``diagnosis``) or not
(``out_of_distribution``), nothing about the lesion, and callbacks, metrics and audit records carry
it already.

Rows stored before migration 0009 hold the findings in plain columns: they read the same, and the
sweeper seals them in batches (:func:`seal_plain_results`) and empties the columns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.orm import Session

from core.crypto import Keyring, SealedBlob, decrypt_blob, encrypt_blob
from core.errors import PeriodKeyDestroyed
from core.models import SEALED_RESULT_FIELDS, BlobKind, Case, CaseBlob, CaseStatus, Result

KIND = BlobKind.RESULT.value
MEDIA_TYPE = "application/json"
#: rows sealed per sweep
BATCH = 500
TABLE = Result.metadata.tables[Result.__tablename__]


@dataclass(frozen=True, slots=True)
class ResultView:
    """A result as an authorised, audited read sees it: the row's plain columns and the opened findings."""

    case_id: uuid.UUID
    outcome: str
    label: str | None
    probabilities: dict[str, float] | None
    confidence: float | None
    uncertainty: float | None
    referral: bool | None
    referral_reasons: list[str]
    ood_reasons: list[str]
    gradcam_class: str | None
    gradcam_status: str
    model_id: str
    weights_sha256: str
    device: str
    timings: dict[str, float]
    input_stats: dict[str, float]
    created_at: datetime


def findings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a result's values that is sealed (lists default to empty, the rest to None)."""
    return {
        name: values.get(name, [] if name in ("referral_reasons", "ood_reasons") else None)
        for name in SEALED_RESULT_FIELDS
    }


def seal_findings(keyring: Keyring, case_id: uuid.UUID, found: Mapping[str, Any], kek_id: str) -> SealedBlob:
    """The findings sealed, their data key wrapped under ``kek_id`` (the case's period key)."""
    document = json.dumps({"v": 1, **findings(found)}, sort_keys=True, separators=(",", ":"))
    return encrypt_blob(keyring, document.encode(), case_id=case_id, kind=KIND, kek_id=kek_id)


def open_findings(keyring: Keyring, case_id: uuid.UUID, sealed: SealedBlob) -> dict[str, Any]:
    document = json.loads(decrypt_blob(keyring, sealed, case_id=case_id, kind=KIND))
    return findings(document)


def new_results(
    keyring: Keyring, results: Iterable[tuple[uuid.UUID, Mapping[str, Any], str]]
) -> tuple[list[dict[str, Any]], list[tuple[uuid.UUID, BlobKind, SealedBlob, str]]]:
    """The rows (findings NULL) for :func:`insert_rows` and the sealed ``result`` blobs (for
    :func:`core.cases.insert_blobs`) that store each (case id, result values, KEK id to wrap under)."""
    rows, blobs = [], []
    for case_id, values, kek_id in results:
        plain = {k: v for k, v in values.items() if k not in SEALED_RESULT_FIELDS}
        rows.append({"case_id": case_id, **plain, **dict.fromkeys(SEALED_RESULT_FIELDS)})
        blobs.append((case_id, BlobKind.RESULT, seal_findings(keyring, case_id, values, kek_id), MEDIA_TYPE))
    return rows, blobs


def insert_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert result rows in one statement. Through the table, not ORM objects: the ORM would leave out
    a NULL finding whose column has a default (the plain rows' ``'[]'``) and store the default."""
    if rows:
        session.execute(insert(TABLE), list(rows))


def _view(row: Any, found: Mapping[str, Any]) -> ResultView:
    """``row``: a :class:`Result` or a row of its columns."""
    return ResultView(
        case_id=row.case_id,
        outcome=row.outcome,
        gradcam_status=row.gradcam_status,
        model_id=row.model_id,
        weights_sha256=row.weights_sha256,
        device=row.device,
        timings=row.timings,
        input_stats=row.input_stats,
        created_at=row.created_at,
        **findings(found),
    )


def _plain(row: Any) -> dict[str, Any] | None:
    """The findings of a row stored before they were sealed; None for a sealed (or shredded) row."""
    if row.ood_reasons is None:
        return None
    return {name: getattr(row, name) for name in SEALED_RESULT_FIELDS}


def read_results(
    session: Session, keyring: Keyring, case_ids: Sequence[uuid.UUID], *, skip_destroyed: bool = False
) -> dict[uuid.UUID, ResultView]:
    """The results of ``case_ids`` with their findings opened, in one query. A case without a result,
    or whose findings were shredded (erasure, retention), is absent. The caller audits the read.

    A result sealed under a destroyed period key (a database restored from a backup older than the
    destruction: docs/OPERATIONS.md) raises :class:`PeriodKeyDestroyed`; with ``skip_destroyed`` it
    is absent like a shredded one, so that one such case does not take a list or a report down."""
    if not case_ids:
        return {}
    rows = session.execute(  # columns, not ORM objects: a drift window reads thousands
        select(*TABLE.columns, CaseBlob.ciphertext, CaseBlob.nonce, CaseBlob.wrapped_key, CaseBlob.kek_id)
        .outerjoin(CaseBlob, and_(CaseBlob.case_id == Result.case_id, CaseBlob.kind == KIND))
        .where(Result.case_id.in_(list(case_ids)))
    ).all()
    found: dict[uuid.UUID, ResultView] = {}
    for row in rows:
        try:
            view = open_result(keyring, row, SealedBlob.from_row(row))
        except PeriodKeyDestroyed:
            if not skip_destroyed:
                raise
            continue
        if view is not None:
            found[row.case_id] = view
    return found


def open_result(keyring: Keyring, row: Any, sealed: SealedBlob | None) -> ResultView | None:
    """The view of a result ``row`` (a :class:`Result` or a row of its columns) whose ``result`` blob is
    ``sealed``: None where its findings were shredded (no plain findings and no blob)."""
    plain = _plain(row)
    if plain is not None:
        return _view(row, plain)
    if sealed is not None:
        return _view(row, open_findings(keyring, row.case_id, sealed))
    return None


def read_result(session: Session, keyring: Keyring, case_id: uuid.UUID) -> ResultView | None:
    return read_results(session, keyring, [case_id]).get(case_id)


def forget_input_statistics(session: Session, case_id: uuid.UUID) -> None:
    """Empty the statistics of the case's upload its result keeps (brightness, contrast, size): with
    its exact size they find the case from a copy of the photo."""
    session.execute(update(Result).where(Result.case_id == case_id).values(input_stats={}))


def shred_plain_findings(session: Session, case_id: uuid.UUID) -> None:
    """Empty the plain findings columns of the case's result (a row stored before they were sealed);
    its ``result`` blob goes with the case's other blobs."""
    session.execute(
        update(Result)
        .where(Result.case_id == case_id, Result.ood_reasons.is_not(None))
        .values(**dict.fromkeys(SEALED_RESULT_FIELDS))
    )


def seal_plain_results(session: Session, keyring: Keyring, *, limit: int = BATCH) -> int:
    """Seal up to ``limit`` results whose findings are still plain (rows older than migration 0009)
    and empty their columns; returns how many. An erased case's are emptied, never sealed: a blob would
    keep its period's key from ever being destroyed. Cheap once none are left (a partial index answers)."""
    from core.cases import insert_blobs
    from core.period_shredding import wrapping_keys

    # The case is locked with its result, as an erasure or a purge locks it first and then its result:
    # a case being erased is passed over, never waited for while holding its result (a deadlock).
    legacy = session.execute(
        select(Result, Case.created_at, Case.status)
        .join(Case, Case.id == Result.case_id)
        .where(Result.ood_reasons.is_not(None))
        .limit(limit)
        .with_for_update(of=[Case, Result], skip_locked=True)  # the case first: a case skipped locks nothing
    ).all()
    if not legacy:
        return 0
    live = [(row, created_at) for row, created_at, status in legacy if status != CaseStatus.PURGED.value]
    wraps = wrapping_keys(session, keyring, [created_at for _, created_at in live]) if live else {}
    sealed = []
    for row, created_at in live:
        plain = _plain(row)
        assert plain is not None  # the query takes plain rows only
        sealed.append(
            (row.case_id, BlobKind.RESULT, seal_findings(keyring, row.case_id, plain, wraps[created_at]), MEDIA_TYPE)
        )
    insert_blobs(session, sealed)
    session.execute(  # sealed, or an erased case's shredded
        update(Result)
        .where(Result.case_id.in_([row.case_id for row, _, _ in legacy]))
        .values(**dict.fromkeys(SEALED_RESULT_FIELDS))
        .execution_options(synchronize_session=False)
    )
    return len(legacy)
