"""The audit log's sealer and its periodic check, as Celery tasks and as a dedicated loop.

    celery -A worker.celery_app beat         # schedules dermq.audit_seal every second, audit_check every minute
    python -m worker.sealing                 # or: a dedicated sealer process (a loop, same work)

Only one sealer writes at a time whatever runs (a Postgres advisory lock, :mod:`core.audit_log`): a
second beat, a redelivered task or a loop beside the beat simply finds the lock taken and returns.
The check recomputes the log from the last verified position (kept beside the witness file,
``<witness>.check``, where no database login can write, and pulled back by a failure any worker
recorded in Postgres; from Postgres alone without one), compares it with
every signed checkpoint and the witness file, and records the result that ``GET
/v1/audit-events/verify`` returns (``audit_verifications``).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from datetime import UTC, datetime
from typing import Any

from core import audit_log, audit_resume, audit_rewalk, audit_verify, db_roles, merkle, witness_scan
from core.checkpoint import SigningKeys, load_signing_keys
from core.config import Settings, get_settings
from core.db import session_scope
from core.queueing import AUDIT_CHECK_KEY, TASK_AUDIT_CHECK, TASK_AUDIT_SEAL
from worker.celery_app import app

log = logging.getLogger("dermq.worker")
_keys: SigningKeys | None = None


def _signing_keys(config: Settings, *, again: bool = False) -> SigningKeys:
    """This process's signing keys; with ``again``, read from the key file anew: a process started
    before a signing-key rotation holds neither the new key nor its verifier key."""
    global _keys
    if _keys is None or again:
        _keys = load_signing_keys(config)
    return _keys


@app.task(name=TASK_AUDIT_SEAL)
def audit_seal() -> dict[str, object]:
    """Sequence the committed audit events into the log and sign a checkpoint."""
    config = app.dermq_settings
    try:
        result = _seal_once(config)
    except audit_log.TamperedLog as exc:  # signs nothing more until someone looks (DermqAuditSealingStalled)
        _refused(exc)
        return {"sealed": 0, "tampered": True}
    if result is None:
        return {"sealed": 0, "busy": True}
    return {"sealed": result.sealed, "size": result.size}


#: monotonic time of the last "not sealing" error logged: once a minute, not at every run (each second)
_refusal_logged = float("-inf")


def _seal_once(config: Settings) -> audit_log.SealResult | None:
    """:func:`core.audit_log.seal_once` with this process's keys; on a refusal, once more with the key
    file read again: a process started before a signing-key rotation cannot verify the checkpoint a
    newer process signed with the new key (the rotated file keeps the old key as retired)."""
    try:
        return audit_log.seal_once(config, _signing_keys(config))
    except audit_log.TamperedLog:
        return audit_log.seal_once(config, _signing_keys(config, again=True))


def _refused(exc: audit_log.TamperedLog) -> None:
    global _refusal_logged
    if time.monotonic() - _refusal_logged >= 60:
        _refusal_logged = time.monotonic()
        # the message holds tree sizes only
        log.error("audit log tampered with, not sealing: %s", exc, extra={"event": "audit_chain_broken"})


#: seconds of walking the log a check may take before it stops at a signed checkpoint and leaves the
#: rest to the next minute's check: a from-scratch walk of a long log (hundreds of millions of events,
#: after a failure or on its first check) would run past the task's time limit, store nothing, and
#: start over each minute
CHECK_BUDGET_SECONDS = 30.0
#: events past its start a check catching up far behind the log's end walks at most (about what a 30 s
#: walk covers): it stops at the last signed checkpoint within them, as at the budget's end
CHECK_WINDOW_EVENTS = 2_000_000


def check(
    config: Settings, keys: SigningKeys, *, budget: float = CHECK_BUDGET_SECONDS, window: int = CHECK_WINDOW_EVENTS
) -> audit_verify.LogReport:
    """Verify what was sealed since the last good check (:func:`audit_resume.resume_point`), for at
    most about ``budget`` seconds, and store the result and where the next check resumes (beside the
    witness file: :func:`audit_resume.keep_place`). First, what
    was appended to the witness file since the last check (:func:`witness_scan.scan`): a rewound log
    fails the check there. Then, once it reached the log's end, a slice of the log walked again from
    where the last re-walk stopped (:mod:`core.audit_rewalk`): an event edited since it was checked
    fails the check there."""
    deadline = time.monotonic() + budget
    witness = config.audit_witness_file  # read from its end: the notes of trees from start on
    begun: merkle.CompactRange | None = None
    with session_scope(config) as session:
        scanned = witness_scan.Scanned(None, None)
        if witness is not None:
            scanned = witness_scan.scan(witness, keys.verifiers, audit_resume.stored_roots(session))
            if scanned.unverified:  # signed with a key newer than this process's: read the key file again
                keys = _signing_keys(config, again=True)
                scanned = witness_scan.scan(witness, keys.verifiers, audit_resume.stored_roots(session))
        highest = scanned.highest.checkpoint if scanned.highest is not None else None
        if scanned.unverified:  # still: the key file lost a verifier key (replaced without its retired ones?)
            reason = "the witness file's largest checkpoint is signed with a key the signing key file does not hold"
            report = audit_verify.LogReport(False, 0, 0, reason=reason)
        elif scanned.problem is not None:
            report = audit_verify.LogReport(False, 0, 0, reason=scanned.problem)
        else:
            start = audit_resume.resume_point(session, witness)
            # the walk extends ``start`` in place: what it was, for where the check after a failure resumes
            begun = None if start is None else merkle.CompactRange(start.size, list(start.hashes))
            report = audit_verify.verify_log(
                session,
                verifiers=keys.verifiers,
                witness=witness,
                start=start,
                deadline=deadline,
                highest=highest,
                window=window,
            )
            seconds = min(config.audit_rewalk_seconds, deadline - time.monotonic())
            if report.ok and report.complete and witness is not None and seconds > 0:
                again = audit_rewalk.step(
                    session, keys.verifiers, witness, seconds=seconds, highest=highest, window=window
                )
                if not again.ok:  # an event the check had passed no longer matches: the check fails
                    report = again
        audit_resume.report_row(session, report)
    if witness is not None:  # after a failure the witness file's scan found: from scratch
        audit_resume.keep_place(witness, report, begun)
    return report


@app.task(name=TASK_AUDIT_CHECK)
def audit_check() -> dict[str, object]:
    """Verify the log incrementally, record the result in Postgres and the gauge's ok flag in Redis."""
    from worker.tasks import _redis_client

    config = app.dermq_settings
    # half the soft time limit at most, as the sweep and the purge take: a check stopped by the limit
    # stores nothing and starts over, every minute
    report = check(config, _signing_keys(config), budget=min(CHECK_BUDGET_SECONDS, config.task_soft_time_limit / 2))
    if not report.complete:  # no verdict on the whole log yet: the gauges keep the last one, and its age
        log.info(
            "audit log check under way",
            extra={"event": "audit_check_partial", "audit_position": report.size},
        )
        return report.to_dict()
    state = {"ok": report.ok, "checked_at": datetime.now(UTC).isoformat(timespec="seconds")}
    _redis_client(config).set(AUDIT_CHECK_KEY, json.dumps(state))
    if not report.ok:
        log.error(
            "audit log verification failed",
            extra={
                "event": "audit_chain_broken",
                "audit_position": report.first_bad_seq,
                "audit_event_id": report.first_bad_event_id,
            },
        )
    return report.to_dict()


def main() -> None:  # pragma: no cover - exercised as a subprocess by the tests
    """A dedicated sealer: seal every ``DERMQ_AUDIT_SEAL_INTERVAL_SECONDS`` until SIGTERM/SIGINT."""
    from core.logs import configure_logging

    config = get_settings()
    configure_logging(config.log_level, json_lines=config.log_json, component="sealer")
    db_roles.refuse_insecure_login(config)
    _signing_keys(config)  # a missing or unreadable key file stops it now, not at its first run
    stopping: list[Any] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    log.info("audit sealer running", extra={"event": "sealer_start"})
    while not stopping:
        started = time.monotonic()
        try:
            _seal_once(config)
        except audit_log.TamperedLog as exc:
            _refused(exc)
        except Exception as exc:  # the database is down: try again next tick
            log.warning("audit sealing failed", extra={"event": "seal_failed", "error": type(exc).__name__})
        time.sleep(max(0.0, config.audit_seal_interval_seconds - (time.monotonic() - started)))


if __name__ == "__main__":  # pragma: no cover
    main()
