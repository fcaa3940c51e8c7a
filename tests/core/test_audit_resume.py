"""Where the periodic audit check may resume (core.audit_resume.trusted_start): at a row any service
login may write, so only where a signed checkpoint vouches for its root and its tree extends the
largest tree the witness file has held. The consistency proof is the guard against stored nodes
crafted to give the scan the old roots and the sealer the new ones: here the stored tree is a list of
leaves, and the proof is computed from it as core.audit_log computes it from audit_nodes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core import audit_log, audit_resume, merkle
from core.checkpoint import Checkpoint

OLD = [merkle.leaf_hash(b"old %d" % i) for i in range(16)]
NEW = OLD[:4] + [merkle.leaf_hash(b"new %d" % i) for i in range(12)]  # a history that parts at 4


def compact(leaves: list[bytes], size: int) -> merkle.CompactRange:
    tree = merkle.CompactRange()
    for leaf in leaves[:size]:
        tree.append(leaf)
    return tree


def signed(leaves: list[bytes], size: int) -> Checkpoint:
    return Checkpoint("dermq.test/audit", size, compact(leaves, size).root(), datetime.now(UTC))


@pytest.fixture
def stored_tree(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """The leaves the stored tree holds (a test puts them in [0]); proofs come from them."""
    holds: list[list[bytes]] = [[]]

    def proof(session: object, old: int, new: int) -> list[bytes]:
        leaves = holds[0]
        return merkle.consistency_proof(old, new, lambda lo, hi: merkle.root_from_leaf_hashes(leaves[lo:hi]))

    monkeypatch.setattr(audit_log, "consistency_proof", proof)
    return holds


def vouched(start: merkle.CompactRange) -> dict[int, list[bytes]]:
    return {start.size: [start.root()]}


def test_a_place_in_the_witnessed_history_is_trusted(stored_tree: list[list[bytes]]) -> None:
    stored_tree[0] = OLD
    start = compact(OLD, 12)
    assert audit_resume.trusted_start(None, start, vouched(start), signed(OLD, 8))  # type: ignore[arg-type]
    assert audit_resume.trusted_start(None, start, vouched(start), None)  # type: ignore[arg-type]


def test_a_place_in_a_history_that_does_not_extend_the_largest_witnessed_tree_is_not(
    stored_tree: list[list[bytes]],
) -> None:
    # the log rewound to 4 and sealed again to 12, a verification row written at 12 (a real, signed
    # checkpoint of the new history), and the witness file's largest tree the old one of 8
    stored_tree[0] = NEW
    start = compact(NEW, 12)
    assert not audit_resume.trusted_start(None, start, vouched(start), signed(OLD, 8))  # type: ignore[arg-type]
    # the same place, with a largest tree at or before where the histories part, is
    assert audit_resume.trusted_start(None, start, vouched(start), signed(OLD, 4))  # type: ignore[arg-type]


def test_a_largest_tree_beyond_the_place_is_left_to_the_walk_and_an_unvouched_place_is_never_trusted(
    stored_tree: list[list[bytes]],
) -> None:
    stored_tree[0] = NEW
    start = compact(NEW, 6)
    assert audit_resume.trusted_start(None, start, vouched(start), signed(OLD, 8))  # type: ignore[arg-type]
    assert not audit_resume.trusted_start(None, start, {6: [compact(OLD, 6).root()]}, None)  # type: ignore[arg-type]
    same_size = signed(OLD, 6)
    assert not audit_resume.trusted_start(None, start, vouched(start), same_size)  # type: ignore[arg-type]
