"""What the operators' ``dermq audit ...`` and ``dermq keys init`` commands do about the audit log,
as plain functions (the CLI only parses arguments and prints): an exit code and a JSON-able answer.

    dermq audit verify [--against FILE] [--all] [--verifier KEY] [--json]  # signatures, roots, events; exit 1 if broken
    dermq audit checkpoint [--verifier KEY] [--json]   # the latest signed checkpoint
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core import audit_log, audit_verify, checkpoint
from core.config import Settings
from core.db import session_scope


def ensure_signing_key(settings: Settings) -> str:
    """Create the checkpoint signing key beside the encryption key file if it is missing."""
    path = checkpoint.signing_key_path(settings)
    if path.exists():
        return f"audit signing key {path} exists; leaving it alone"
    keys = checkpoint.generate(settings.audit_log_origin)
    checkpoint.write_signing_keys(path, keys)
    return (
        f"created audit signing key {path} (mode 0600); give auditors its verifier key: {keys.signer.verifier.encode()}"
    )


def _verifiers(settings: Settings, given: Sequence[checkpoint.Verifier]) -> tuple[checkpoint.Verifier, ...]:
    """The verifier keys given (an auditor's, who holds no signing key), else those of the signing key
    file (an operator on a host that runs the sealer)."""
    return tuple(given) if given else checkpoint.load_signing_keys(settings).verifiers


def latest_checkpoint(settings: Settings, verifiers: Sequence[checkpoint.Verifier] = ()) -> dict[str, Any] | None:
    """The latest signed checkpoint, its signature checked (:class:`checkpoint.CheckpointError` if no
    verifier key verifies it, or if the row's size and root are not its note's), and the key that
    did. The size, root and time shown are the signed note's: the row's columns are the services'
    login's to write, and one holding an older genuine note beside a size of its choosing was
    printed as verified."""
    known = _verifiers(settings, verifiers)
    with session_scope(settings) as session:
        stored = audit_log.latest_checkpoint(session)
    if stored is None:
        return None
    signed, signer = checkpoint.verified(stored.note, known)
    if (signed.size, signed.root) != (stored.size, stored.root):
        raise checkpoint.CheckpointError(
            f"the latest checkpoint row (size {stored.size}) differs from its signed note (size {signed.size})"
        )
    return {
        "size": signed.size,
        "root": audit_log.root_b64(signed.root),
        "signed_at": signed.time.isoformat(),
        "checkpoint": stored.note,
        "verifier_key": signer.encode(),
    }


def describe(report: audit_verify.LogReport) -> str:
    if report.ok:
        return (
            f"audit log intact: {report.checked} events recomputed, {report.checkpoints} signed checkpoints "
            f"match, tree size {report.size}"
        )
    where = f"position {report.first_bad_seq}" if report.first_bad_seq is not None else "the log"
    event = f" (event {report.first_bad_event_id})" if report.first_bad_event_id is not None else ""
    return f"AUDIT LOG BROKEN at {where}{event}: {report.reason} ({report.checked} events before it verified)"


#: a signed checkpoint is a few hundred bytes; its JSON form (``dermq audit checkpoint --json``) a little more
_PINNED_MAX_BYTES = 64 * 1024


def pinned_note(path: Path) -> str:
    """The signed note in a pinned checkpoint file: the note as ``dermq audit checkpoint`` prints it,
    or the JSON that ``--json`` and ``GET /v1/audit/checkpoints/latest`` give (its ``checkpoint``), a
    byte-order mark allowed. ``ValueError`` saying what the file is instead."""
    try:
        with path.open("rb") as pinned:
            data = pinned.read(_PINNED_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"it cannot be read ({exc.strerror})") from None
    if len(data) > _PINNED_MAX_BYTES:
        raise ValueError(f"it is over {_PINNED_MAX_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        try:
            found = json.loads(text).get("checkpoint")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: arrays nested thousands deep
            found = None
        if not isinstance(found, str):
            raise ValueError('it is JSON without a "checkpoint"')
        return found
    return text


def verify(
    settings: Settings,
    against: Path | None = None,
    *,
    every: bool = False,
    verifiers: Sequence[checkpoint.Verifier] = (),
) -> tuple[int, dict[str, Any], str]:
    """Check every signature and root; with ``against``, prove the log extends that pinned checkpoint;
    with ``every``, go on past the first problem and list them all. Signatures are checked with
    ``verifiers`` when given (no signing key needed), else with the signing key file's."""
    known = _verifiers(settings, verifiers)
    witness = settings.audit_witness_file
    note = None
    if against is not None:
        try:
            note = pinned_note(against)
        except ValueError as exc:
            return 2, {"ok": False, "reason": str(exc)}, f"the --against file {against} is not a checkpoint: {exc}"
    with session_scope(settings) as session:
        if note is None:
            report = audit_verify.verify_log(session, verifiers=known, witness=witness, every=every)
            pinned = None
        else:
            try:
                pinned, report = audit_verify.verify_against(session, note, known, witness=witness, every=every)
            except checkpoint.MalformedCheckpoint as exc:  # the wrong file: nothing was checked
                return 2, {"ok": False, "reason": str(exc)}, f"the --against file is not a checkpoint: {exc}"
            except checkpoint.CheckpointError as exc:
                return 1, {"ok": False, "reason": str(exc)}, f"PINNED CHECKPOINT REJECTED: {exc}"
    answer = report.to_dict()
    text = describe(report)
    if every and len(report.problems) > 1:
        text += "".join(f"\n  position {p}: {reason}" for p, _, reason in report.problems)
    if pinned is not None:
        answer["pinned_size"] = pinned.size
        if report.ok:
            text += f"; it extends the pinned checkpoint of size {pinned.size}"
    return (0 if report.ok else 1), answer, text
