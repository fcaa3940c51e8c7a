"""The sealer: sequences committed audit events into an RFC 9162 Merkle log and signs checkpoints.

Writers insert events without any lock (:func:`core.audit.record`). One sealer at a time (a
transaction-scoped advisory lock that only the sealer takes) then, every second or so:

1. takes the events whose inserting transaction (``txid``) is older than the oldest transaction
   still running (``pg_snapshot_xmin(pg_current_snapshot())``): those are committed (or rolled back,
   and then invisible), and no transaction that could still commit an older event remains. A
   transaction with a smaller id that commits after a larger one is therefore sealed in a later run,
   never skipped. They are ordered by ``(txid, id)`` after the last sealed event: one stable order.
   A database restored from a dump into another cluster keeps its rows' transaction ids, which the
   new cluster's own may lie below: the sealer then also takes the restored events after its place
   and the new cluster's own events after its place's id (:data:`_UNSEALED_AFTER_RESTORE`);
2. appends their leaf hashes (``audit_leaves``) and the hashes of every perfect subtree completed by
   them (``audit_nodes``), so proofs need O(log n) stored hashes;
3. signs a checkpoint of the new tree (:mod:`core.checkpoint`) and stores it (``audit_checkpoints``);
4. commits, then appends the checkpoint to the witness file outside Postgres.

A sealer killed at any point loses nothing: its transaction rolls back and the next run seals the
same events in the same order. A checkpoint committed but not yet witnessed is superseded by the
next one, which extends it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import column, insert, table, text
from sqlalchemy.orm import Session

from core import merkle, witness
from core.audit import LEAF_COLUMNS_SQL, leaf_bytes_from_columns
from core.checkpoint import Checkpoint, CheckpointError, SigningKeys, parse
from core.config import Settings
from core.db import session_scope

#: pg_try_advisory_xact_lock key held by the one sealer ("dermr": next to the old chain lock's "dermq").
SEALER_LOCK = 0x6465726D72
BATCH = 20_000
LEAVES = table("audit_leaves", column("seq"), column("event_id"), column("leaf_hash"))
NODES = table("audit_nodes", column("level"), column("idx"), column("hash"))


@dataclass(frozen=True, slots=True)
class SealResult:
    sealed: int
    size: int
    root: bytes
    note: str | None


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root: bytes
    signed_at: datetime
    note: str


def latest_checkpoint(session: Session) -> StoredCheckpoint | None:
    row = session.execute(
        text("SELECT size, root, signed_at, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1")
    ).first()
    return StoredCheckpoint(row.size, bytes(row.root), row.signed_at, row.note) if row else None


def tree_size(session: Session) -> int:
    return int(session.scalar(text("SELECT coalesce(max(seq) + 1, 0) FROM audit_leaves")) or 0)


# --------------------------------------------------------------------------- stored tree


class StoredTree:
    """MTH of any range of the stored tree, read from ``audit_nodes`` (levels >= 1) and ``audit_leaves``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cache: dict[tuple[int, int], bytes] = {}

    def node(self, level: int, idx: int) -> bytes:
        key = (level, idx)
        if key not in self.cache:
            if level == 0:
                value = self.session.scalar(text("SELECT leaf_hash FROM audit_leaves WHERE seq = :i"), {"i": idx})
            else:
                value = self.session.scalar(
                    text("SELECT hash FROM audit_nodes WHERE level = :l AND idx = :i"), {"l": level, "i": idx}
                )
            if value is None:
                raise LookupError(f"the stored tree has no node ({level}, {idx})")
            self.cache[key] = bytes(value)
        return self.cache[key]

    def subtree(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for the ranges RFC 9162's recursion asks for."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            level = n.bit_length() - 1
            return self.node(level, lo >> level)
        k = merkle.split(n)
        return merkle.node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def root(self, size: int) -> bytes:
        return merkle.EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def frontier(self, size: int) -> list[tuple[int, int]]:
        """(level, index) of the perfect subtrees of a tree of ``size``, biggest first."""
        out, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                out.append((level, start >> level))
                start += 1 << level
        return out


class NotSealed(LookupError):
    """The event has no position in the tree of the size asked for (not sealed yet, or sealed later)."""


def inclusion_proof(session: Session, event_id: int, size: int) -> tuple[int, bytes, list[bytes]]:
    """(leaf index, leaf hash, audit path) of an event in the tree of ``size`` (RFC 9162 2.1.3.1):
    :class:`NotSealed` when the event is not in that tree, a plain ``LookupError`` when the stored
    tree lacks a node the path needs (rows deleted: the log no longer holds what was signed)."""
    row = session.execute(
        text("SELECT seq, leaf_hash FROM audit_leaves WHERE event_id = :id"), {"id": event_id}
    ).first()
    if row is None or not 0 <= row.seq < size:  # (a negative position: outside the log, migration 0029)
        raise NotSealed("the event is not (yet) in the tree of that size")
    tree = StoredTree(session)
    return row.seq, bytes(row.leaf_hash), merkle.inclusion_proof(row.seq, size, tree.subtree)


def consistency_proof(session: Session, old_size: int, new_size: int) -> list[bytes]:
    return merkle.consistency_proof(old_size, new_size, StoredTree(session).subtree)


# --------------------------------------------------------------------------- sealing


#: the sealer's place: its last sealed event
_PLACE = text(
    "SELECT e.txid::text AS txid, e.id FROM audit_leaves l JOIN audit_events e ON e.id = l.event_id "
    "ORDER BY l.seq DESC LIMIT 1"
)
#: The committed events after the place, in the order to seal them: one range of the (txid, id)
#: index, below the oldest running transaction (``xmin``), stopping at the batch's limit.
_UNSEALED = """
    FROM audit_events e
    WHERE e.txid < pg_snapshot_xmin(pg_current_snapshot())
      AND (e.txid, e.id) > (CAST(:txid AS xid8), :id)
      AND NOT EXISTS (SELECT 1 FROM audit_leaves l WHERE l.event_id = e.id)
    ORDER BY e.txid, e.id
"""
#: Whether a database restored from a dump into another cluster (the rows keep the old cluster's
#: transaction ids) left events that range cannot reach: the place itself in this cluster's future
#: (restored events after it too), or this cluster's own events below the place (their ids follow
#: every restored one: a probe of the primary key after the place's id, over the unsealed tail).
#: Restored events a little ahead of a place in the present wait until the cluster's ids pass theirs:
#: the ids the old cluster gave out between its last seal and its dump, seconds' worth.
_RESTORED = text(
    """
    SELECT CAST(:txid AS xid8) >= pg_snapshot_xmax(pg_current_snapshot()) AS ahead,
           EXISTS (SELECT 1 FROM audit_events e
                   WHERE e.id > :id AND e.txid < CAST(:txid AS xid8)
                     AND NOT EXISTS (SELECT 1 FROM audit_leaves l WHERE l.event_id = e.id)) AS below
    """
)
#: After such a restore: the restored events after the place in the cluster's future (a dump holds
#: committed rows only) first, then this cluster's committed ones after the place, in (txid, id) or
#: in id order. Events already sealed are passed over: restored ones come after the place again
#: once the cluster's ids reach theirs, and after a second restore, those of the first.
_UNSEALED_AFTER_RESTORE = """
    FROM audit_events e
    WHERE e.id IN (
            SELECT id FROM audit_events
            WHERE txid >= pg_snapshot_xmax(pg_current_snapshot()) AND (txid, id) > (CAST(:txid AS xid8), :id)
            UNION
            SELECT id FROM audit_events
            WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) AND (txid, id) > (CAST(:txid AS xid8), :id)
            UNION
            SELECT id FROM audit_events WHERE id > :id AND txid < pg_snapshot_xmin(pg_current_snapshot())
        )
      AND NOT EXISTS (SELECT 1 FROM audit_leaves l WHERE l.event_id = e.id)
    ORDER BY e.txid >= pg_snapshot_xmax(pg_current_snapshot()) DESC, e.txid, e.id
"""


def _unsealed(session: Session) -> tuple[str, dict[str, object]]:
    """The FROM ... ORDER BY of the committed events not sealed yet and its parameters: the ordinary
    range, or after a restore into another cluster the ranges that reach what it left."""
    last = session.execute(_PLACE).first()
    place: dict[str, object] = {"txid": last.txid, "id": last.id} if last else {"txid": "0", "id": 0}
    strays = session.execute(_RESTORED, place).one()
    return (_UNSEALED_AFTER_RESTORE if strays.ahead or strays.below else _UNSEALED), place


def _pending(session: Session, limit: int) -> list[tuple[int, bytes]]:
    """(event id, leaf hash) of committed, unsealed events in the order to seal them (:func:`_unsealed`)."""
    unsealed, place = _unsealed(session)
    rows = session.execute(text(f"SELECT {LEAF_COLUMNS_SQL} {unsealed} LIMIT :limit"), {**place, "limit": limit})
    return [(row[0], merkle.leaf_hash(leaf_bytes_from_columns(row))) for row in rows.all()]


_LAST_SEALED_ID = text("SELECT coalesce(max(event_id), 0) FROM audit_leaves")  # the unique index's last entry
#: a primary-key range; the age by the database's clock, which dated the event (migration 0021)
_FIRST_AFTER = text(
    "SELECT extract(epoch FROM clock_timestamp() - occurred_at)::float8 FROM audit_events"
    " WHERE id > :id ORDER BY id LIMIT 1"
)


def unsealed_age(session: Session) -> float | None:
    """How long ago, in seconds, the first committed event with an id past every sealed one was written
    (None: there is none): how far sealing lags, whatever holds it up: a stalled or refusing sealer, or
    a long transaction anywhere in the cluster (the sealer waits for every older one to end). By the
    database's clock, which dated the event: the asking host's clock plays no part. An event that
    committed late with an id below a sealed one is not counted: events after it are."""
    return session.scalar(_FIRST_AFTER, {"id": session.scalar(_LAST_SEALED_ID)})


class TamperedLog(RuntimeError):
    """The stored tree no longer hashes to the last checkpoint signed: the sealer signs nothing more."""


def _signed_tree(session: Session, keys: SigningKeys, size: int) -> StoredTree:
    """The stored tree, once it is checked to still hash to the latest signed checkpoint. Signing a
    new checkpoint over it vouches for all of it: over nodes an insider rewrote (an event, its leaf
    and the hashes above it), the next checkpoint would be a valid signature over the forged history.
    Nor over leaves past it (the services' login may insert leaves): one inserted out of turn moves
    the sealer's place past the events before it (``audit verify`` names them, as skipped)."""
    tree = StoredTree(session)
    latest = latest_checkpoint(session)
    if latest is None:
        if size:
            raise TamperedLog(f"the log holds {size} events and no signed checkpoint")
        return tree
    if size != latest.size:
        raise TamperedLog(f"the log holds {size} events; its latest signed checkpoint {latest.size}")
    try:
        signed = parse(latest.note, list(keys.verifiers))
    except CheckpointError:
        raise TamperedLog(f"the stored checkpoint of size {latest.size} has no valid signature") from None
    if (signed.size, signed.root) != (latest.size, latest.root):  # an older genuine note in a newer row
        raise TamperedLog(f"the stored checkpoint of size {latest.size} differs from its signed note")
    try:
        matches = tree.root(signed.size) == signed.root
    except LookupError:
        matches = False
    if not matches:
        raise TamperedLog(f"the stored tree no longer hashes to the signed checkpoint of size {signed.size}")
    return tree


def _append(session: Session, tree: StoredTree, old_size: int, leaves: Sequence[bytes]) -> bytes:
    """Store the nodes completed by appending ``leaves`` to a tree of ``old_size``; return the new root."""
    level_hashes: dict[int, dict[int, bytes]] = {0: {old_size + i: h for i, h in enumerate(leaves)}}
    new_size = old_size + len(leaves)
    rows = []
    level = 1
    while (new_size >> level) > (old_size >> level):
        below = level_hashes[level - 1]
        current: dict[int, bytes] = {}
        for idx in range(old_size >> level, new_size >> level):
            left = below.get(2 * idx) or tree.node(level - 1, 2 * idx)
            right = below.get(2 * idx + 1) or tree.node(level - 1, 2 * idx + 1)
            current[idx] = merkle.node_hash(left, right)
            rows.append({"level": level, "idx": idx, "hash": current[idx]})
        level_hashes[level] = current
        level += 1
    if rows:
        session.execute(insert(NODES), rows)
    for lvl, idx in tree.frontier(new_size):
        if idx in level_hashes.get(lvl, {}):
            tree.cache[(lvl, idx)] = level_hashes[lvl][idx]
    return tree.root(new_size)


def seal(session: Session, keys: SigningKeys, origin: str, *, limit: int = BATCH) -> SealResult | None:
    """One sealing step in ``session``'s transaction; None when another sealer holds the lock.

    Call it in a transaction of its own and commit; then witness ``note`` (:func:`seal_once` does).
    """
    if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SEALER_LOCK}):
        return None
    old_size = tree_size(session)
    pending = _pending(session, limit)
    if not pending:
        latest = latest_checkpoint(session)
        root = latest.root if latest else merkle.EMPTY_ROOT
        return SealResult(0, old_size, root, None)
    tree = _signed_tree(session, keys, old_size)
    leaves = [h for _, h in pending]
    session.execute(  # one multi-row INSERT per batch of rows (insert() constructs, not text())
        insert(LEAVES),
        [{"seq": old_size + i, "event_id": event_id, "leaf_hash": h} for i, (event_id, h) in enumerate(pending)],
    )
    new_size = old_size + len(pending)
    root = _append(session, tree, old_size, leaves)
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # what the note's time line holds
    note = Checkpoint(origin, new_size, root, now).sign(keys.signer)
    session.execute(
        text("INSERT INTO audit_checkpoints (size, root, signed_at, note) VALUES (:s, :r, :t, :n)"),
        {"s": new_size, "r": root, "t": now, "n": note},
    )
    return SealResult(len(pending), new_size, root, note)


def seal_once(settings: Settings, keys: SigningKeys, *, limit: int = BATCH) -> SealResult | None:
    """Seal what is committed (in batches of ``limit``), commit each batch, then witness its checkpoint."""
    total, result = 0, None
    while True:
        with session_scope(settings) as session:
            step = seal(session, keys, settings.audit_log_origin, limit=limit)
        if step is None:
            return None
        if step.note is not None and settings.audit_witness_file is not None:
            witness.append(settings.audit_witness_file, step.note)
        total += step.sealed
        result = SealResult(total, step.size, step.root, step.note or (result.note if result else None))
        if step.sealed < limit:
            return result


def root_b64(root: bytes) -> str:
    return base64.b64encode(root).decode()
