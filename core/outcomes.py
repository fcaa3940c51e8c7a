"""Confirmed outcomes and the model's performance in the field.

A clinic reports a finished case's confirmed diagnosis (histopathology, follow-up, consensus or
confocal microscopy); a second report replaces the first (a correction) and both are audited as
``case.outcome``. The audit detail carries the method and the revision, never the diagnosis:
auditors do not see clinical results. The diagnosis is about the patient: it is sealed as the case's
``outcome`` blob (under the case's period key, like its image), never stored in a plain column
(reports from before migration 0010 are sealed by the sweeper, :func:`seal_plain_diagnoses`).

Each report also counts the case in ``outcome_tallies`` (:class:`core.outcome_models.OutcomeTally`):
per model, how many confirmed cases had each (model's answer, referral, confirmed diagnosis), with no
case, clinic or time; and in ``outcome_monthly_tallies`` the same per month of submission, kept for
the months of the recent window only. The model's answer is read from the sealed result once, when
the clinic reports (an audited request that already holds the keys); a correction moves the case's
count to its new cell. The months give field performance a recent window (:func:`window_start`)
beside the figures over all time: a model that starts to miss melanomas after years of good service
shows in the window long before it moves its lifetime figures.

Erasure and retention remove the confirmed outcome with the case's other patient data, and the
tally keeps the counts, so :func:`field_performance` (``dermq monitor report``) needs no key
and loses nothing when cases are purged. Per model: each class's sensitivity and positive predictive
value, and the referral sensitivity (confirmed malignant or pre-malignant cases the model referred),
each with a Wilson 95% interval. Out-of-distribution results made no diagnosis and no referral:
a confirmed case of a class the gate turned away counts as missed in that class's sensitivity and, if
it is malignant or pre-malignant, as not referred (the clinic got no answer; the model card's figures
leave the gate out). So a gate that starts turning melanomas away shows in the melanoma figures and
their alert. They are not in any PPV (no label). :func:`melanoma_alerts` says when melanoma
sensitivity has fallen below the model card's floor by more than noise explains.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import Table, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import audit, results
from core.cases import owned_case
from core.crypto import Keyring, decrypt_blob, encrypt_blob
from core.errors import Conflict, Gone, InvalidInput
from core.keys import Principal
from core.models import BlobKind, Case, CaseBlob, CaseStatus, Outcome
from core.outcome_models import ConfirmationMethod, ConfirmedOutcome, OutcomeMonthlyTally, OutcomeTally
from core.phi import refused_if_destroyed
from ml.labels import CLASSES, CONCERNING

ACTION = "case.outcome"
#: the tally's ``predicted`` for a result without a diagnosis
OUT_OF_DISTRIBUTION = Outcome.OUT_OF_DISTRIBUTION.value
Z95 = 1.959963984540054
#: Confirmed melanomas (those the gate turned away included) a model needs before its field sensitivity
#: may raise an alert.
#: With the rule of :func:`melanoma_alerts` and 20 melanomas, a model that performs as its card says
#: (0.493, floor 0.397) raises it in 0.2% of reports, one whose sensitivity fell to 0.2 in 41%; the
#: point estimate alone would have fired in 15% of reports on a model with nothing wrong.
MIN_CONFIRMED_MELANOMAS = 20


def _validated(diagnosis: str, method: str) -> tuple[str, ConfirmationMethod]:
    if diagnosis not in CLASSES:
        raise InvalidInput(
            # not echoed: a confirmed diagnosis in free text is the patient's
            f"unknown diagnosis; the diagnoses are: {', '.join(CLASSES)}",
            code="unknown_diagnosis",
        )
    try:
        return diagnosis, ConfirmationMethod(method)
    except ValueError:
        raise InvalidInput(
            f"unknown method {method[:32]!r}; the methods are: {', '.join(m.value for m in ConfirmationMethod)}",
            code="unknown_method",
        ) from None


#: a change to a tally cell's count: ((model id, the model's answer, referral, diagnosis), month, +1 or -1)
Change = tuple[tuple[str, str, bool, str], date | None, int]
_CELL = ("model_id", "predicted", "referral", "truth")


def _tally(session: Session, changes: list[Change]) -> None:
    """Add each change to its cell's count over all time and, unless its month is None (a report counted
    before migration 0020 or by the release before it), in that month. A month the purge has dropped
    (older than the recent window) is not made again by taking a count back. The rows change in one
    order, lifetime cells then monthly ones, each sorted: two corrections moving counts between two
    cells in opposite directions took their locks in opposite orders (a deadlock: Postgres failed one)."""
    for cell, _, change in sorted(changes, key=lambda c: c[0]):
        key = dict(zip(_CELL, cell, strict=True))
        up = insert(OutcomeTally).values(**key, count=change)
        session.execute(up.on_conflict_do_update(index_elements=_CELL, set_={"count": OutcomeTally.count + change}))
    for cell, month, change in sorted((c for c in changes if c[1] is not None), key=lambda c: (c[0], str(c[1]))):
        key, table = dict(zip(_CELL, cell, strict=True)), OutcomeMonthlyTally
        if change < 0:
            matches = (*(getattr(table, k) == v for k, v in key.items()), table.month == month)
            session.execute(update(table).where(*matches).values(count=table.count + change))
            continue
        up = insert(table).values(**key, month=month, count=change)
        session.execute(up.on_conflict_do_update(index_elements=[*key, "month"], set_={"count": table.count + change}))


def prune_monthly(session: Session, *, before: date) -> int:
    """Delete the monthly counts of months before ``before`` (the recent window's first month): the
    lifetime tally keeps them. Returns how many cells went."""
    deleted = session.execute(delete(OutcomeMonthlyTally).where(OutcomeMonthlyTally.month < before))
    return int(getattr(deleted, "rowcount", 0) or 0)


def month_of(moment: datetime) -> date:
    """The tally's month of a case submitted at ``moment``: the first day of its month, in UTC."""
    return moment.astimezone(UTC).date().replace(day=1)


def window_start(months: int, today: date | None = None) -> date:
    """The first month of a window of ``months`` months that ends with (and includes) ``today``'s
    (this month's, in UTC, by default)."""
    today = today or datetime.now(UTC).date()
    index = today.year * 12 + today.month - 1 - (months - 1)
    return date(index // 12, index % 12 + 1, 1)


def _answer(result: results.ResultView) -> tuple[str, bool]:
    """The model's answer as the tally counts it: (label or ``out_of_distribution``, referral)."""
    if result.outcome == Outcome.DIAGNOSIS and result.label is not None:
        return result.label, bool(result.referral)
    return OUT_OF_DISTRIBUTION, False


# --------------------------------------------------------------------------- the diagnosis at rest

#: the confirmed diagnosis is about the patient: sealed like the result's findings, never a plain column
KIND = BlobKind.OUTCOME.value
MEDIA_TYPE = "text/plain; charset=utf-8"


def _seal_diagnosis(session: Session, keyring: Keyring, case: Case, diagnosis: str) -> None:
    """Store ``diagnosis`` as the case's ``outcome`` blob (replacing one there), its data key wrapped
    under the key of the case's period, like every other blob of the case."""
    from core.cases import insert_blobs
    from core.period_shredding import wrapping_keys

    kek_id = wrapping_keys(session, keyring, [case.created_at])[case.created_at]
    sealed = encrypt_blob(keyring, diagnosis.encode(), case_id=case.id, kind=KIND, kek_id=kek_id)
    session.execute(delete(CaseBlob).where(CaseBlob.case_id == case.id, CaseBlob.kind == KIND))
    insert_blobs(session, [(case.id, BlobKind.OUTCOME, sealed, MEDIA_TYPE)])


def _diagnosis(session: Session, keyring: Keyring, row: ConfirmedOutcome) -> str:
    """The diagnosis a stored report holds: sealed, or plain in a row from before migration 0010."""
    if row.diagnosis is not None:
        return row.diagnosis
    blob = session.scalar(select(CaseBlob).where(CaseBlob.case_id == row.case_id, CaseBlob.kind == KIND))
    if blob is None:
        raise RuntimeError("a confirmed outcome has neither a plain nor a sealed diagnosis")
    return decrypt_blob(keyring, blob.sealed, case_id=row.case_id, kind=KIND).decode()


def seal_plain_diagnoses(session: Session, keyring: Keyring, *, limit: int = 500) -> int:
    """Seal up to ``limit`` diagnoses still stored in plain text (reports from before migration 0010)
    and empty their column; returns how many. An erased case's report is removed, as its erasure does,
    never sealed (a blob would keep its period's key alive). Cheap once none are left (a partial index)."""
    # the case locked with its report, in the order an erasure takes them (see results.seal_plain_results)
    legacy = session.execute(
        select(ConfirmedOutcome.case_id, ConfirmedOutcome.diagnosis, Case.status)
        .join(Case, Case.id == ConfirmedOutcome.case_id)
        .where(ConfirmedOutcome.diagnosis.is_not(None))
        .limit(limit)
        .with_for_update(of=[Case, ConfirmedOutcome], skip_locked=True)
    ).all()
    if not legacy:
        return 0
    erased = [case_id for case_id, _, status in legacy if status == CaseStatus.PURGED.value]
    for case_id, diagnosis, status in legacy:
        if status != CaseStatus.PURGED.value and diagnosis is not None and (case := session.get(Case, case_id)):
            _seal_diagnosis(session, keyring, case, diagnosis)
    if erased:
        session.execute(delete(ConfirmedOutcome).where(ConfirmedOutcome.case_id.in_(erased)))
    ids = [case_id for case_id, _, _ in legacy]
    session.execute(update(ConfirmedOutcome).where(ConfirmedOutcome.case_id.in_(ids)).values(diagnosis=None))
    return len(legacy)


def record_outcome(
    session: Session,
    *,
    keyring: Keyring,
    principal: Principal,
    actor: audit.Actor,
    case_id: uuid.UUID,
    diagnosis: str,
    method: str,
) -> tuple[ConfirmedOutcome, bool]:
    """Store (or replace) the confirmed outcome of a finished case and count it in the tally;
    returns (outcome, was_correction)."""
    case = owned_case(session, principal, case_id, ACTION, for_update=True)  # one report at a time per case
    try:
        diagnosis, confirmed_by = _validated(diagnosis, method)
    except InvalidInput as exc:  # audited like every refusal, with its reason, never what was sent
        exc.audit = audit.PendingEvent(ACTION, audit.FAILURE, "case", str(case_id), {"reason": exc.code})
        raise
    if case.status == CaseStatus.PURGED:
        raise Gone(
            "this case's result was erased (retention or deletion); an outcome can no longer be compared with it",
            code="case_purged",
            audit=audit.PendingEvent(ACTION, audit.FAILURE, "case", str(case_id), {"reason": "purged"}),
        )
    with refused_if_destroyed(ACTION, case_id):
        result = results.read_result(session, keyring, case_id) if case.status == CaseStatus.SUCCEEDED else None
    if case.status == CaseStatus.FAILED:  # it never will succeed: "not finished" would keep a client retrying
        raise Conflict(
            f"the case failed ({case.failure_code}); an outcome can be reported only for a case that has succeeded",
            code="case_failed",
            audit=audit.PendingEvent(ACTION, audit.FAILURE, "case", str(case_id), {"reason": "failed"}),
        )
    if result is None:
        raise Conflict(
            f"the case is {case.status}; an outcome can be reported only for a case that has succeeded",
            code="case_not_finished",
            audit=audit.PendingEvent(ACTION, audit.FAILURE, "case", str(case_id), {"reason": "not_finished"}),
        )
    predicted, referral = _answer(result)
    row = session.get(ConfirmedOutcome, case_id)
    correction = row is not None
    if row is not None and row.method == confirmed_by.value and _diagnosis(session, keyring, row) == diagnosis:
        # the same report again (a client's retry of one whose answer it lost): nothing changes,
        # no revision is made that would read as a correction
        _record(session, actor, case, {"method": row.method, "revision": row.revision, "unchanged": True})
        return row, True
    month = month_of(case.created_at)
    changes: list[Change] = [((result.model_id, predicted, referral, diagnosis), month, +1)]
    if row is None:
        row = ConfirmedOutcome(case_id=case_id, clinic_id=case.clinic_id, diagnosis=None, method=confirmed_by.value)
        row.revision = 1
        session.add(row)
    else:  # the count moves out of the cells it was made in (the lifetime one alone for a report counted before 0020)
        earlier = (result.model_id, predicted, referral, _diagnosis(session, keyring, row))
        changes.append((earlier, row.tally_month, -1))
        row.diagnosis, row.method = None, confirmed_by.value
        row.revision += 1
        row.updated_at = datetime.now(UTC)
    _tally(session, changes)
    row.tally_month = month
    _seal_diagnosis(session, keyring, case, diagnosis)
    row.reported_by = principal.key_id
    session.flush()
    session.refresh(row)
    _record(session, actor, case, {"method": confirmed_by.value, "revision": row.revision, "correction": correction})
    return row, correction


def _record(session: Session, actor: audit.Actor, case: Case, detail: dict[str, object]) -> None:
    audit.record(
        session,
        action=ACTION,
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        detail=detail,
    )


# --------------------------------------------------------------------------- field performance


@dataclass(frozen=True, slots=True)
class Rate:
    """successes of trials, with its Wilson score 95% interval (None when there are no trials)."""

    successes: int
    trials: int

    @property
    def value(self) -> float | None:
        return self.successes / self.trials if self.trials else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.successes, self.trials)

    def as_dict(self) -> dict[str, Any]:
        low_high = self.interval
        return {
            "value": self.value,
            "successes": self.successes,
            "trials": self.trials,
            "ci95": list(low_high) if low_high else None,
        }


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Confirmed cases alike: the model's answer and the truth, and how many cases gave them."""

    model_id: str
    label: str | None  # None: out of distribution
    referral: bool | None
    truth: str
    count: int = 1


def field_performance(rows: Iterable[Confirmed]) -> dict[str, dict[str, Any]]:
    """Per model: confirmed and out-of-distribution counts, per-class sensitivity and PPV, and the
    referral sensitivity on confirmed malignant or pre-malignant cases (``CONCERNING``). A case the
    gate turned away is a miss in its class's sensitivity and in the referral sensitivity."""
    by_model: dict[str, list[Confirmed]] = {}
    for row in rows:
        by_model.setdefault(row.model_id, []).append(row)
    report: dict[str, dict[str, Any]] = {}
    for model_id, confirmed in sorted(by_model.items()):
        scored = [r for r in confirmed if r.label is not None]
        classes = {}
        for code in CLASSES:
            true_positives = sum(r.count for r in scored if r.truth == code and r.label == code)
            classes[code] = {
                # of the class's confirmed cases, those the gate turned away: misses the classifier did not make
                "out_of_distribution": sum(r.count for r in confirmed if r.truth == code and r.label is None),
                "sensitivity": Rate(true_positives, sum(r.count for r in confirmed if r.truth == code)).as_dict(),
                "ppv": Rate(true_positives, sum(r.count for r in scored if r.label == code)).as_dict(),
            }
        concerning = [r for r in confirmed if r.truth in CONCERNING]  # a gated one was not referred
        total = sum(r.count for r in confirmed)
        report[model_id] = {
            "confirmed": total,
            "out_of_distribution": total - sum(r.count for r in scored),
            "classes": classes,
            "referral_sensitivity": Rate(
                sum(r.count for r in concerning if r.referral), sum(r.count for r in concerning)
            ).as_dict(),
        }
    return report


def confirmed_cases(session: Session, *, model_id: str | None = None, since: date | None = None) -> list[Confirmed]:
    """The confirmed cases counted in the tally (optionally one model's), the erased and purged too,
    a :class:`Confirmed` per cell of alike ones (a report's cost grows with the cells, not the cases);
    with ``since``, only the cases submitted in that month or later (the monthly tally: reports counted
    before migration 0020 are not in it; its months' cells of one answer and truth are summed)."""
    table = cast(Table, (OutcomeTally if since is None else OutcomeMonthlyTally).__table__)
    query = select(table.c.model_id, table.c.predicted, table.c.referral, table.c.truth, table.c.count).where(
        table.c.count > 0
    )
    if model_id is not None:
        query = query.where(table.c.model_id == model_id)
    if since is not None:
        query = query.where(table.c.month >= since)
    cells: dict[tuple[str, str | None, bool | None, str], int] = {}
    for model, predicted, referral, truth, count in session.execute(query):
        gated = predicted == OUT_OF_DISTRIBUTION
        key = (model, None if gated else predicted, None if gated else referral, truth)
        cells[key] = cells.get(key, 0) + count
    return [Confirmed(*key, count=count) for key, count in cells.items()]


def melanoma_alerts(
    report: dict[str, dict[str, Any]], floors: dict[str, float | None], *, min_confirmed: int = MIN_CONFIRMED_MELANOMAS
) -> list[dict[str, Any]]:
    """Models whose melanoma sensitivity on confirmed cases is below ``floors[model]`` (the lower end
    of the model card's 95% interval) beyond sampling noise: the upper end of the field's Wilson 95%
    interval is below the floor, on at least ``min_confirmed`` confirmed melanomas. One alert each,
    with the figures behind it. The DermqFieldMelanomaSensitivityLow alert applies the same rule to
    the ``dermq_field_*`` gauges."""
    found = []
    for model_id, figures in report.items():
        floor = floors.get(model_id)
        observed = figures["classes"]["mel"]["sensitivity"]
        if floor is None or observed["trials"] < min_confirmed or observed["ci95"] is None:
            continue
        if observed["ci95"][1] < floor:
            found.append(
                {
                    "model_id": model_id,
                    "alert": "mel_sensitivity_below_model_card",
                    "observed": observed["value"],
                    "ci95": observed["ci95"],
                    "confirmed_melanomas": observed["trials"],
                    "floor": floor,
                }
            )
    return found
