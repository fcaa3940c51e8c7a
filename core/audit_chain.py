"""The hash chain of the audit rows written before the Merkle log (revision 0005), kept checkable.

Each such row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical content;
rows written since carry no chain hashes (NULL) and are covered by the Merkle log instead
(:mod:`core.audit_log`). :func:`chain_hash` is also the baseline of ``bench/audit_verify.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.audit import _content, canonical
from core.models import AuditEvent

GENESIS = "0" * 64


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical(_content(event))}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str | None = None
    last_hash: str | None = None
    last_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_id": self.first_bad_id,
            "reason": self.reason,
            "last_hash": self.last_hash,
        }


def _rows(session: Session, batch: int, after_id: int = 0) -> Iterator[AuditEvent]:
    last_id = after_id
    while True:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.id > last_id, AuditEvent.hash.is_not(None))
            .order_by(AuditEvent.id)
            .limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()


def verify_chain(session: Session, *, batch: int = 2000) -> ChainReport:
    """Walk the chained rows in id order and report the first one whose link or hash is wrong."""
    expected_prev, checked, last_id = GENESIS, 0, None
    for event in _rows(session, batch):
        if event.prev_hash != expected_prev:
            return ChainReport(
                False,
                checked,
                event.id,
                "prev_hash does not match the previous row's hash (a row was removed, inserted or reordered)",
            )
        if chain_hash(expected_prev, event) != event.hash:
            return ChainReport(False, checked, event.id, "content does not match its hash (the row was altered)")
        expected_prev, last_id = event.hash or GENESIS, event.id
        checked += 1
    return ChainReport(True, checked, last_hash=expected_prev if checked else None, last_id=last_id)
